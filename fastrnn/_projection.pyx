# Kernels of the LSTM with a projection (PyTorch's ``LSTM(proj_size=P)``;
# Sak, Senior and Beaufays 2014, "LSTM recurrent neural network architectures
# for large scale acoustic modeling"). The state h has P < H values, the
# cell c has H:
#
#   i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of gx_t + W_hh h_{t-1}  (4H)
#   c_t = f * c_{t-1} + i * g,   m_t = o * tanh(c_t)                      (H)
#   h_t = W_hr m_t                                                        (P)
#
# gx_t = W_ih x_t + b_ih + b_hh is the input projection of every step,
# computed before the time loop (_forward.project). How a layer runs
# (_projection_engine.py drives it): ``recur`` per step multiplies the
# rows of a part by W_hh^T (BLAS), runs the gates, then multiplies the new
# m by W_hr^T (BLAS). BPTT: ``backward`` per step (reverse order)
# dm = dh . W_hr, the gates' backward, dh_{t-1} = dG . W_hh; the weight
# and input gradients after the loop are _backward.weight_grads and
# input_grad as for the plain layers, dW_hr the sums of dh_t^T m_t.
#
# float32: both products on the micro-kernel over W_hh and W_hr packed once
# per parameter set (forward: _forward.pack_weights; BPTT: _backward.pack_rows),
# every element one fixed chain, so a row's result does not depend on the
# other rows nor on the thread count. float64: BLAS (the plan holds it at
# one thread).
#
# Layout as in _forward.pyx: R = T * B rows in the input's order (row
# t * row_t + b * row_b), direction d owns a column block of each buffer.
# The gate pass and its backward are the plain LSTM's (_gates.lstm_row,
# lstm_back_row: tanh(c_t) recomputed in BPTT). Per row and direction the
# forward saves (training; in inference the same buffers are a (B, .)
# scratch):
#   acts (R, dirs * 4H)  i, f, g, o
#   m    (R, dirs * H)   o * tanh(c_t), the projection's input
#   h_prev (R, dirs * P), c_prev (R, dirs * H)  the states before the step
# Variable lengths: row b is active at step t iff t < lengths[b], in both
# directions: an inactive row keeps its state, gets a zero output, zero
# saves and zero gradients of every saved quantity, so that BPTT's sums
# over rows never meet uninitialised values.

from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

from fastrnn._worker cimport Interrupt, MAX_PARTS, interrupted, run_parts
from fastrnn._blas cimport gemm
from fastrnn._microkernel cimport Packed, FASTRNN_MK_ZERO, describe_packed, packed_product
from fastrnn._gates cimport (lstm_row, lstm_back_row, fastrnn_flush_denormals,
                             fastrnn_restore_fpenv)
from cython cimport floating

# acts per row and direction, in units of H
cdef enum:
    ACTS = 4
SAVED = ACTS


cdef struct ProjJob:
    bint is_double, train
    Py_ssize_t T, B, H, P, dirs, row_t, row_b, W
    const void* gx          # (R, dirs * 4H): the input projection, biases added
    const void* w_hh        # (dirs * 4H, P)
    const void* w_hr        # (dirs * P, H)
    void* h                 # (dirs, B, P)
    void* c                 # (dirs, B, H)
    void* out               # (R, dirs * P)
    void* acts              # see the module comment
    void* m
    void* h_prev            # training: (R, dirs * P)
    void* c_prev            # training: (R, dirs * H)
    void* work              # (dirs * B, W): one row per direction and batch row
    # backward only
    const void* dout        # (R, dirs * P)
    void* dh                # (dirs, B, P)
    void* dc                # (dirs, B, H)
    void* dgx               # (R, dirs * 4H): the gates' pre-activation gradients
    void* dhr               # (R, dirs * P): the gradient of h_t, for dW_hr
    const int64_t* lengths
    Py_ssize_t ranges[MAX_PARTS][4]   # per part: d_lo, d_hi, b_lo, b_hi
    Interrupt interrupt
    # float32: per direction W_hh and W_hr packed for the products (forward:
    # h @ W_hh^T, m @ W_hr^T; backward: dh @ W_hr, dG @ W_hh)
    bint has_packed
    Packed packed_hh[2]
    Packed packed_hr[2]


cdef inline bint _active(ProjJob* j, Py_ssize_t t, Py_ssize_t b) noexcept nogil:
    return j.lengths == NULL or t < j.lengths[b]


# --- forward ---

cdef void _forward_direction(ProjJob* j, Py_ssize_t d, Py_ssize_t b_lo, Py_ssize_t b_hi,
                             const floating* gx, const floating* w_hh, const floating* w_hr,
                             floating* h, floating* c, floating* out, floating* acts,
                             floating* m, floating* h_prev, floating* c_prev,
                             floating* work) noexcept nogil:
    """Direction d, batch rows [b_lo, b_hi), every step. h, c, work already
    at this direction's first row; the other pointers the whole buffers'.
    work rows: the recurrent product (4H), a scratch (H), the new h (P)."""
    cdef Py_ssize_t H = j.H, P = j.P, dirs = j.dirs, T = j.T, M = b_hi - b_lo
    cdef Py_ssize_t GH = 4 * H, A = ACTS * H
    cdef Py_ssize_t s, t, b, k, row, saved, first
    cdef Py_ssize_t ld_m = (j.row_b if j.train else 1) * dirs * H
    cdef floating* wrow
    cdef floating* a
    cdef const floating* g_in
    cdef floating* mrow
    for s in range(T):
        if interrupted(&j.interrupt):
            return
        t = T - 1 - s if d == 1 else s
        if j.train:   # the state this step starts from
            for b in range(b_lo, b_hi):
                row = t * j.row_t + b * j.row_b
                memcpy(h_prev + row * dirs * P + d * P, h + (b - b_lo) * P, P * sizeof(floating))
                memcpy(c_prev + row * dirs * H + d * H, c + (b - b_lo) * H, H * sizeof(floating))
        # work (M, 4H) = h @ W_hh^T
        if floating is float and j.has_packed:
            packed_product(M, h, P, 1, &j.packed_hh[d], work, j.W, H, FASTRNN_MK_ZERO, NULL)
        else:
            gemm(False, True, <int>M, <int>GH, <int>P, <floating>1, h, <int>P,
                 w_hh + d * GH * P, <int>P, <floating>0, work, <int>j.W)
        for b in range(b_lo, b_hi):
            row = t * j.row_t + b * j.row_b
            saved = row if j.train else b
            a = acts + saved * dirs * A + d * A
            mrow = m + saved * dirs * H + d * H
            if not _active(j, t, b):
                memset(out + row * dirs * P + d * P, 0, P * sizeof(floating))
                memset(a, 0, A * sizeof(floating))
                memset(mrow, 0, H * sizeof(floating))
                continue
            wrow = work + (b - b_lo) * j.W
            g_in = gx + row * dirs * GH + d * GH
            for k in range(GH):
                wrow[k] = wrow[k] + g_in[k]
            # m = o * tanh(c_t) (the plain cell's h), its copy to the scratch
            lstm_row(wrow, mrow, c + (b - b_lo) * H, wrow + GH, a, H, H)
        # the new h of every row of the range: work[:, 5H:] (M, P) = m @ W_hr^T
        first = (t * j.row_t + b_lo * j.row_b) if j.train else b_lo
        if floating is float and j.has_packed:
            packed_product(M, m + first * dirs * H + d * H, ld_m, 1, &j.packed_hr[d],
                           work + GH + H, j.W, P, FASTRNN_MK_ZERO, NULL)
        else:
            gemm(False, True, <int>M, <int>P, <int>H, <floating>1, m + first * dirs * H + d * H,
                 <int>ld_m, w_hr + d * P * H, <int>H, <floating>0, work + GH + H, <int>j.W)
        for b in range(b_lo, b_hi):
            if _active(j, t, b):
                row = t * j.row_t + b * j.row_b
                wrow = work + (b - b_lo) * j.W + GH + H
                memcpy(h + (b - b_lo) * P, wrow, P * sizeof(floating))
                memcpy(out + row * dirs * P + d * P, wrow, P * sizeof(floating))


cdef void _forward_part(ProjJob* j, int part, const floating* gx, const floating* w_hh,
                        const floating* w_hr, floating* h, floating* c, floating* out,
                        floating* acts, floating* m, floating* h_prev, floating* c_prev,
                        floating* work) noexcept nogil:
    cdef Py_ssize_t d_lo = j.ranges[part][0], d_hi = j.ranges[part][1]
    cdef Py_ssize_t b_lo = j.ranges[part][2], b_hi = j.ranges[part][3]
    cdef Py_ssize_t d, B = j.B
    cdef unsigned int fpenv
    if d_hi <= d_lo or b_hi <= b_lo:
        return
    fpenv = fastrnn_flush_denormals()
    for d in range(d_lo, d_hi):
        _forward_direction(j, d, b_lo, b_hi, gx, w_hh, w_hr, h + (d * B + b_lo) * j.P,
                           c + (d * B + b_lo) * j.H, out, acts, m, h_prev, c_prev,
                           work + (d * B + b_lo) * j.W)
    fastrnn_restore_fpenv(fpenv)


cdef void _forward_job(void* arg, int part) noexcept nogil:
    cdef ProjJob* j = <ProjJob*>arg
    if j.is_double:
        _forward_part(j, part, <const double*>j.gx, <const double*>j.w_hh,
                      <const double*>j.w_hr, <double*>j.h, <double*>j.c, <double*>j.out,
                      <double*>j.acts, <double*>j.m, <double*>j.h_prev, <double*>j.c_prev,
                      <double*>j.work)
    else:
        _forward_part(j, part, <const float*>j.gx, <const float*>j.w_hh,
                      <const float*>j.w_hr, <float*>j.h, <float*>j.c, <float*>j.out,
                      <float*>j.acts, <float*>j.m, <float*>j.h_prev, <float*>j.c_prev,
                      <float*>j.work)


cdef int _check(object a, Py_ssize_t rows, Py_ssize_t cols, str name) except -1:
    """A buffer of the caller must be (rows, cols): a mismatch is a bug of
    the caller, reported as ValueError, never memory misread."""
    if a is None or a.shape[0] != rows or a.shape[1] != cols:
        raise ValueError(f"projection kernel: {name} does not fit the layer")
    return 0


cdef int _common(ProjJob* job, Py_ssize_t T, bint batch_first, floating[:, :, ::1] h,
                 floating[:, :, ::1] c, const floating[:, ::1] w_hh,
                 const floating[:, ::1] w_hr, const int64_t[::1] lengths,
                 floating[:, ::1] work, Py_ssize_t min_work) except -1:
    """The job's sizes and shared pointers, every shape checked."""
    job.is_double = floating is double
    job.T = T
    job.dirs = h.shape[0]
    job.B = h.shape[1]
    job.P = h.shape[2]
    job.H = c.shape[2]
    job.row_t = 1 if batch_first else job.B
    job.row_b = T if batch_first else 1
    job.W = work.shape[1]
    if (job.dirs not in (1, 2) or c.shape[0] != job.dirs or c.shape[1] != job.B
            or w_hh.shape[0] != job.dirs * 4 * job.H or w_hh.shape[1] != job.P
            or w_hr.shape[0] != job.dirs * job.P or w_hr.shape[1] != job.H
            or work.shape[0] != job.dirs * job.B or job.W < min_work
            or (lengths is not None and lengths.shape[0] != job.B)):
        raise ValueError("projection kernel: the buffers do not fit the layer")
    job.w_hh = &w_hh[0, 0]
    job.w_hr = &w_hr[0, 0]
    job.h = &h[0, 0, 0]
    job.c = &c[0, 0, 0]
    job.work = &work[0, 0]
    job.lengths = NULL if lengths is None else &lengths[0]
    return 0


def pack_forward(const float[:, ::1] w_hh not None, const float[:, ::1] w_hr not None,
                 Py_ssize_t dirs):
    """A float32 layer's W_hh (dirs * 4H, P) and W_hr (dirs * P, H) packed per
    direction for ``recur``'s products h @ W_hh^T and m @ W_hr^T: ([W_hh per
    direction], [W_hr per direction])."""
    from fastrnn._kernels import forward
    H, P = w_hr.shape[1], w_hr.shape[0] // dirs
    return ([forward.pack_weights(w_hh, d * 4 * H, H, 4) for d in range(dirs)],
            [forward.pack_weights(w_hr, d * P, P, 1) for d in range(dirs)])


def pack_backward(const float[:, ::1] w_ih not None, const float[:, ::1] w_hh not None,
                  const float[:, ::1] w_hr not None, Py_ssize_t dirs):
    """The same for ``backward``'s products dh @ W_hr and dG @ W_hh, and
    W_ih (all its rows) for the input gradient dG @ W_ih
    (_backward.input_grad): ([W_hh per direction], [W_hr per direction],
    W_ih)."""
    from fastrnn._kernels import backward
    H, P = w_hr.shape[1], w_hr.shape[0] // dirs
    return ([backward.pack_rows(w_hh, d * 4 * H, 4 * H) for d in range(dirs)],
            [backward.pack_rows(w_hr, d * P, P) for d in range(dirs)],
            backward.pack_rows(w_ih, 0, w_ih.shape[0]))


cdef int _describe(ProjJob* job, packed, bint backward) except -1:
    """The packed weights' descriptors (float32 with ``packed`` given)."""
    cdef Py_ssize_t d, H = job.H, P = job.P
    job.has_packed = False
    if job.is_double or packed is None:
        return 0
    packed_hh, packed_hr = packed[:2]
    if len(packed_hh) != job.dirs or len(packed_hr) != job.dirs:
        raise ValueError("projection kernel: packed does not fit the layer")
    for d in range(job.dirs):
        if backward:   # B = W_hh (4H x P), W_hr (P x H)
            describe_packed(&job.packed_hh[d], packed_hh[d], 4 * H, P, 1)
            describe_packed(&job.packed_hr[d], packed_hr[d], P, H, 1)
        else:          # B = W_hh^T (P x 4H, four gate blocks), W_hr^T (H x P)
            describe_packed(&job.packed_hh[d], packed_hh[d], P, H, 4)
            describe_packed(&job.packed_hr[d], packed_hr[d], H, P, 1)
    job.has_packed = True
    return 0


def recur(*, Py_ssize_t T, bint batch_first, parts,
          const floating[:, ::1] w_hh not None, const floating[:, ::1] w_hr not None,
          floating[:, :, ::1] h not None, floating[:, :, ::1] c not None,
          const floating[:, ::1] gx not None, floating[:, ::1] out not None,
          const int64_t[::1] lengths, bint train, floating[:, ::1] acts not None,
          floating[:, ::1] m not None, floating[:, ::1] h_prev, floating[:, ::1] c_prev,
          floating[:, ::1] work not None, packed=None):
    """The time loops of one projected LSTM layer after the input projection
    (gx, biases added), in the plan's ``parts`` (d_lo, d_hi, b_lo, b_hi);
    a second part runs on the worker thread.

    h (dirs, B, P), c (dirs, B, H): the initial state in, the final state
    out. acts, m: see the module comment, (R, .) in training, (B, .) in
    inference; h_prev, c_prev (R, dirs * P), (R, dirs * H) in training,
    else None. work (dirs * B, >= 5H + P) scratch. packed (float32):
    ``pack_forward``'s (W_hh, W_hr per direction); None: BLAS.
    """
    cdef ProjJob job
    cdef Py_ssize_t rows
    if T == 0 or h.shape[1] == 0:
        return
    _common(&job, T, batch_first, h, c, w_hh, w_hr, lengths, work, 5 * c.shape[2] + h.shape[2])
    rows = T * job.B if train else job.B
    job.train = train
    _check(gx, T * job.B, job.dirs * 4 * job.H, "gx")
    _check(out, T * job.B, job.dirs * job.P, "out")
    _check(acts, rows, job.dirs * ACTS * job.H, "acts")
    _check(m, rows, job.dirs * job.H, "m")
    if train:
        _check(h_prev, rows, job.dirs * job.P, "h_prev")
        _check(c_prev, rows, job.dirs * job.H, "c_prev")
    job.gx = &gx[0, 0]
    job.out = &out[0, 0]
    job.acts = &acts[0, 0]
    job.m = &m[0, 0]
    job.h_prev = NULL if not train else &h_prev[0, 0]
    job.c_prev = NULL if not train else &c_prev[0, 0]
    _describe(&job, packed, False)
    run_parts(_forward_job, &job, &job.ranges[0][0], 4, parts, &job.interrupt)


# --- BPTT ---

cdef void _backward_direction(ProjJob* j, Py_ssize_t d, Py_ssize_t b_lo, Py_ssize_t b_hi,
                              const floating* w_hh, const floating* w_hr,
                              const floating* acts, const floating* c_prev,
                              const floating* dout, floating* dh, floating* dc,
                              floating* dgx, floating* dhr, floating* work) noexcept nogil:
    """Direction d, batch rows [b_lo, b_hi), every step in reverse. dh, dc,
    work already at this direction's first row. work rows: dm (H), then
    the new dh (P)."""
    cdef Py_ssize_t H = j.H, P = j.P, dirs = j.dirs, T = j.T, M = b_hi - b_lo
    cdef Py_ssize_t GH = 4 * H, A = ACTS * H
    cdef Py_ssize_t s, t, b, k, row, first
    cdef floating* dhrow
    cdef floating* dgrow
    for s in range(T):
        if interrupted(&j.interrupt):
            return
        t = s if d == 1 else T - 1 - s
        # the gradient of h_t: the carried one plus the output's
        for b in range(b_lo, b_hi):
            row = t * j.row_t + b * j.row_b
            dhrow = dh + (b - b_lo) * P
            if _active(j, t, b):
                for k in range(P):
                    dhrow[k] = dhrow[k] + dout[row * dirs * P + d * P + k]
                memcpy(dhr + row * dirs * P + d * P, dhrow, P * sizeof(floating))
            else:
                memset(dhr + row * dirs * P + d * P, 0, P * sizeof(floating))
        # work[:, :H] (M, H) = dh @ W_hr: the gradient of m_t
        if floating is float and j.has_packed:
            packed_product(M, dh, P, 1, &j.packed_hr[d], work, j.W, H, FASTRNN_MK_ZERO, NULL)
        else:
            gemm(False, False, <int>M, <int>H, <int>P, <floating>1, dh, <int>P,
                 w_hr + d * P * H, <int>H, <floating>0, work, <int>j.W)
        for b in range(b_lo, b_hi):
            row = t * j.row_t + b * j.row_b
            dgrow = dgx + row * dirs * GH + d * GH
            if not _active(j, t, b):
                memset(dgrow, 0, GH * sizeof(floating))
                continue
            # the plain cell's backward from dm, the gradient of its h
            lstm_back_row(acts + row * dirs * A + d * A, c_prev + row * dirs * H + d * H,
                          work + (b - b_lo) * j.W, dc + (b - b_lo) * H, dgrow, H)
        # work[:, H:] (M, P) = dG @ W_hh: the gradient of h_{t-1} (active rows)
        first = t * j.row_t + b_lo * j.row_b
        if floating is float and j.has_packed:
            packed_product(M, dgx + first * dirs * GH + d * GH, j.row_b * dirs * GH, 1,
                           &j.packed_hh[d], work + H, j.W, P, FASTRNN_MK_ZERO, NULL)
        else:
            gemm(False, False, <int>M, <int>P, <int>GH, <floating>1,
                 dgx + first * dirs * GH + d * GH, <int>(j.row_b * dirs * GH),
                 w_hh + d * GH * P, <int>P, <floating>0, work + H, <int>j.W)
        for b in range(b_lo, b_hi):
            if _active(j, t, b):
                memcpy(dh + (b - b_lo) * P, work + (b - b_lo) * j.W + H, P * sizeof(floating))


cdef void _backward_part(ProjJob* j, int part, const floating* w_hh, const floating* w_hr,
                         const floating* acts, const floating* c_prev, const floating* dout,
                         floating* dh, floating* dc, floating* dgx, floating* dhr,
                         floating* work) noexcept nogil:
    cdef Py_ssize_t d_lo = j.ranges[part][0], d_hi = j.ranges[part][1]
    cdef Py_ssize_t b_lo = j.ranges[part][2], b_hi = j.ranges[part][3]
    cdef Py_ssize_t d, B = j.B
    cdef unsigned int fpenv
    if d_hi <= d_lo or b_hi <= b_lo:
        return
    fpenv = fastrnn_flush_denormals()
    for d in range(d_lo, d_hi):
        _backward_direction(j, d, b_lo, b_hi, w_hh, w_hr, acts, c_prev, dout,
                            dh + (d * B + b_lo) * j.P, dc + (d * B + b_lo) * j.H, dgx, dhr,
                            work + (d * B + b_lo) * j.W)
    fastrnn_restore_fpenv(fpenv)


cdef void _backward_job(void* arg, int part) noexcept nogil:
    cdef ProjJob* j = <ProjJob*>arg
    if j.is_double:
        _backward_part(j, part, <const double*>j.w_hh, <const double*>j.w_hr,
                       <const double*>j.acts, <const double*>j.c_prev, <const double*>j.dout,
                       <double*>j.dh, <double*>j.dc, <double*>j.dgx, <double*>j.dhr,
                       <double*>j.work)
    else:
        _backward_part(j, part, <const float*>j.w_hh, <const float*>j.w_hr,
                       <const float*>j.acts, <const float*>j.c_prev, <const float*>j.dout,
                       <float*>j.dh, <float*>j.dc, <float*>j.dgx, <float*>j.dhr,
                       <float*>j.work)


def backward(*, Py_ssize_t T, bint batch_first, parts,
             const floating[:, ::1] w_hh not None, const floating[:, ::1] w_hr not None,
             const floating[:, ::1] acts not None, const floating[:, ::1] c_prev not None,
             const floating[:, ::1] dout not None, floating[:, :, ::1] dh not None,
             floating[:, :, ::1] dc not None, floating[:, ::1] dgx not None,
             floating[:, ::1] dhr not None, const int64_t[::1] lengths,
             floating[:, ::1] work not None, packed=None):
    """BPTT through one projected LSTM layer's time loops, in the plan's
    ``parts``. In: the forward's saves (acts, c_prev), dout (R, dirs * P)
    the gradient of the layer's output. dh (dirs, B, P), dc (dirs, B, H):
    the final state's gradients in, the initial state's out. Out: dgx
    (R, dirs * 4H) the gradients of the gates' pre-activations (of gx and
    of W_hh h), dhr (R, dirs * P) those of every h_t. work (dirs * B,
    >= H + P) scratch. packed (float32): ``pack_backward``'s; None: BLAS."""
    cdef ProjJob job
    cdef Py_ssize_t R
    if T == 0 or dh.shape[1] == 0:
        return
    _common(&job, T, batch_first, dh, dc, w_hh, w_hr, lengths, work, dc.shape[2] + dh.shape[2])
    R = T * job.B
    _check(acts, R, job.dirs * ACTS * job.H, "acts")
    _check(c_prev, R, job.dirs * job.H, "c_prev")
    _check(dout, R, job.dirs * job.P, "dout")
    _check(dgx, R, job.dirs * 4 * job.H, "dgx")
    _check(dhr, R, job.dirs * job.P, "dhr")
    job.acts = <void*>&acts[0, 0]
    job.c_prev = <void*>&c_prev[0, 0]
    job.dout = &dout[0, 0]
    job.dh = &dh[0, 0, 0]
    job.dc = &dc[0, 0, 0]
    job.dgx = &dgx[0, 0]
    job.dhr = &dhr[0, 0]
    _describe(&job, packed, True)
    run_parts(_backward_job, &job, &job.ranges[0][0], 4, parts, &job.interrupt)
