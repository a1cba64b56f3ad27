# Kernels of the layer-normalised LSTM and GRU (layer_norm=True; Ba, Kiros
# and Hinton 2016, "Layer Normalization", eq. 20-22). The equations, with
# LN(v; a, b) = a * (v - mean(v)) / sqrt(var(v) + LN_EPS) + b over the whole
# vector v of one row (mean and biased variance over its n values):
#
#   LSTM  pre = LN(W_ih x; a_ih, b_ih) + LN(W_hh h; a_hh, b_hh) + b_ih + b_hh  (4H)
#         i, f, o = sigmoid(pre_i, pre_f, pre_o), g = tanh(pre_g)
#         c' = f * c + i * g,  h' = o * tanh(LN(c'; a_c, b_c))               (H)
#   GRU   gx = LN(W_ih x; a_ih, b_ih) + b_ih, gh = LN(W_hh h; a_hh, b_hh) + b_hh  (3H)
#         r = sigmoid(gx_r + gh_r), z = sigmoid(gx_z + gh_z)
#         n = tanh(gx_n + r * gh_n),  h' = (1 - z) * n + z * h   (reset after)
#
# How a layer runs (_layernorm_engine.py drives it): the input projection of
# every step without bias (_forward.project), then ``normalise_rows`` (the
# input-side LN of every row, the biases added), then ``recur``: per step the
# recurrent product h @ W_hh^T (float32: the micro-kernel over the packed
# W_hh of _forward.pack_recurrent; float64: BLAS), its LN and one fused pass
# over the rows. BPTT: ``backward`` per step (the elementwise and LN
# backward, then dh += da_h . W_hh), then ``normalise_rows_backward`` (the
# input-side LN backward); the weight and input gradients after the loop
# are _backward.weight_grads and input_grad, unchanged.
#
# Layout as in _forward.pyx: R = T * B rows in the input's order (row
# t * row_t + b * row_b), direction d owns a column block of each buffer.
# Per row and direction the forward saves (training; in inference the same
# buffers are a (B, .) scratch):
#   hhat (R, dirs * G * H)  the normalised recurrent product
#   acts (R, dirs * A * H)  LSTM A = 7: i, f, g, o, c', the normalised c', tanh(LN(c'));
#                           GRU A = 4: r, z, n, gh_n
#   rstd (R, dirs * 2)      1 / sqrt(var + eps) of the recurrent product and (LSTM) of c'
# The LN parameters of a direction are one row of P values: a_ih, b_ih,
# a_hh, b_hh (G * H each) and, LSTM, a_c, b_c (H each).
#
# Variable lengths: row b is active at step t iff t < lengths[b], in both
# directions, as in _forward.pyx: an inactive row keeps its state, gets a
# zero output, zero saves (training) and zero gradients of every saved
# quantity, so that BPTT's sums over rows never meet uninitialised values.

cimport numpy as cnp
from cython cimport floating
from libc.math cimport sqrt
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

cnp.import_array()

from fastrnn._worker cimport Interrupt, MAX_PARTS, interrupted, run_parts
from fastrnn._microkernel cimport (Packed, FASTRNN_MK_FROM_C, FASTRNN_MK_ZERO,
                                  FASTRNN_MK_LANES, fastrnn_mk_groups, fastrnn_mk_packed_size,
                                  packed_product, unit_blocks_per_group, describe_packed)
from fastrnn._blas cimport gemm
from fastrnn._gates cimport (tanh_, gru_row, lstm_activations, fastrnn_flush_denormals,
                             fastrnn_restore_fpenv)

# the epsilon inside every LN's square root
cdef double EPS = 1e-5
LN_EPS = EPS

cdef enum:
    KIND_LSTM = 0
    KIND_GRU = 1

# exported so that Python names the kinds and sizes once
LSTM = KIND_LSTM
GRU = KIND_GRU
SAVED = {KIND_LSTM: 7, KIND_GRU: 4}   # acts per row and direction, in units of H


# Sums over a row in SUM_LANES independent partial sums (then added in a
# fixed order): the compiler vectorises them, which a single running sum
# (one chain of dependent adds, C's order) forbids without -ffast-math.
# Measured (LSTM b32-t100-h128, float32, one thread): the forward took 2.8x
# the plain LSTM's time with one running double sum per pass; the input side
# alone (3200 rows of 512) 2.8 ms, 0.45-0.6 ms with these.
cdef enum:
    SUM_LANES = 16


cdef inline floating _sum(const floating* v, Py_ssize_t n) noexcept nogil:
    cdef floating acc[SUM_LANES]
    cdef floating total = 0
    cdef Py_ssize_t j, k, whole = n - n % SUM_LANES
    for k in range(SUM_LANES):
        acc[k] = 0
    j = 0
    while j < whole:
        for k in range(SUM_LANES):
            acc[k] = acc[k] + v[j + k]
        j += SUM_LANES
    for j in range(whole, n):
        total = total + v[j]
    for k in range(SUM_LANES):
        total = total + acc[k]
    return total


cdef inline floating _sum_squares(const floating* v, floating m, Py_ssize_t n) noexcept nogil:
    """The sum of (v - m)^2."""
    cdef floating acc[SUM_LANES]
    cdef floating total = 0, diff
    cdef Py_ssize_t j, k, whole = n - n % SUM_LANES
    for k in range(SUM_LANES):
        acc[k] = 0
    j = 0
    while j < whole:
        for k in range(SUM_LANES):
            diff = v[j + k] - m
            acc[k] = acc[k] + diff * diff
        j += SUM_LANES
    for j in range(whole, n):
        diff = v[j] - m
        total = total + diff * diff
    for k in range(SUM_LANES):
        total = total + acc[k]
    return total


cdef inline floating _sum_products(const floating* a, const floating* b,
                                   Py_ssize_t n) noexcept nogil:
    """The sum of a * b."""
    cdef floating acc[SUM_LANES]
    cdef floating total = 0
    cdef Py_ssize_t j, k, whole = n - n % SUM_LANES
    for k in range(SUM_LANES):
        acc[k] = 0
    j = 0
    while j < whole:
        for k in range(SUM_LANES):
            acc[k] = acc[k] + a[j + k] * b[j + k]
        j += SUM_LANES
    for j in range(whole, n):
        total = total + a[j] * b[j]
    for k in range(SUM_LANES):
        total = total + acc[k]
    return total


cdef inline floating _normalise(const floating* v, Py_ssize_t n, floating* vhat) noexcept nogil:
    """vhat = (v - mean(v)) / sqrt(var(v) + EPS) over n values (two passes:
    the mean, then the squared deviations from it); returns 1 / sqrt(var + EPS)."""
    cdef floating m = _sum(v, n) / n
    cdef floating rstd = <floating>(1.0 / sqrt(<double>(_sum_squares(v, m, n) / n) + EPS))
    cdef Py_ssize_t j
    for j in range(n):
        vhat[j] = (v[j] - m) * rstd
    return rstd


cdef inline void _normalise_backward(const floating* dy, const floating* vhat, floating rstd,
                                     Py_ssize_t n, floating* dv) noexcept nogil:
    """dv = rstd * (dy - mean(dy) - vhat * mean(dy * vhat)): the gradient of
    v through vhat = (v - mean) * rstd, given dy = dL/dvhat (dv may be dy)."""
    cdef floating m1 = _sum(dy, n) / n
    cdef floating m2 = _sum_products(dy, vhat, n) / n
    cdef Py_ssize_t j
    for j in range(n):
        dv[j] = rstd * (dy[j] - m1 - vhat[j] * m2)


# --- the input side: every row at once, before and after the time loops ---

cdef struct RowsJob:
    # what normalise_rows(_backward)'s parts share, and each part's rows [lo, hi)
    bint is_double
    Py_ssize_t dirs, GH, P
    void* a                 # forward: a (R, dirs * GH); backward: dy
    const void* ahat        # backward: the normalised values
    void* out               # forward: out (R, dirs * GH)
    void* rstd              # (R, dirs)
    const void* ln
    const void* bias        # forward: (dirs * GH,) or NULL
    Py_ssize_t rows[MAX_PARTS][2]


cdef void _normalise_part(RowsJob* j, int part, floating* a, floating* out, floating* rstd,
                          const floating* ln, const floating* bias) noexcept nogil:
    cdef Py_ssize_t r, d, k, GH = j.GH, dirs = j.dirs
    cdef floating* row
    cdef floating* o
    cdef const floating* gain
    cdef const floating* shift
    cdef const floating* b
    for r in range(j.rows[part][0], j.rows[part][1]):
        for d in range(dirs):
            row = a + (r * dirs + d) * GH
            o = out + (r * dirs + d) * GH
            gain = ln + d * j.P
            shift = gain + GH
            rstd[r * dirs + d] = _normalise(row, GH, row)
            if bias == NULL:
                for k in range(GH):
                    o[k] = gain[k] * row[k] + shift[k]
            else:
                b = bias + d * GH
                for k in range(GH):
                    o[k] = gain[k] * row[k] + shift[k] + b[k]


cdef void _normalise_job(void* arg, int part) noexcept nogil:
    cdef RowsJob* j = <RowsJob*>arg
    if j.is_double:
        _normalise_part(j, part, <double*>j.a, <double*>j.out, <double*>j.rstd,
                        <const double*>j.ln, <const double*>j.bias)
    else:
        _normalise_part(j, part, <float*>j.a, <float*>j.out, <float*>j.rstd,
                        <const float*>j.ln, <const float*>j.bias)


def normalise_rows(*, floating[:, ::1] a not None, const floating[::1] ln not None,
                   const floating[::1] bias, floating[:, ::1] rstd not None,
                   floating[:, ::1] out not None, Py_ssize_t P, parts):
    """Per row and direction d: a's block (G * H values, the input
    projection W_ih x) is replaced by its normalised values, rstd[:, d] gets
    their 1 / std, and out's block = a_ih * normalised + b_ih (+ bias: the
    bias folded for the cell, or None; out may be a). ln (dirs * P,) the LN
    parameters. ``parts``: ranges of rows (r0, r1), one per thread."""
    cdef RowsJob job
    cdef Py_ssize_t R = a.shape[0]
    job.dirs = rstd.shape[1]
    if R == 0:
        return
    job.GH = a.shape[1] // job.dirs
    if (rstd.shape[0] != R or out.shape[0] != R or out.shape[1] != a.shape[1]
            or ln.shape[0] < job.dirs * P or P < 2 * job.GH
            or (bias is not None and bias.shape[0] != a.shape[1])):
        raise ValueError("layer norm kernel: the buffers do not fit the layer")
    job.is_double = floating is double
    job.P = P
    job.a = &a[0, 0]
    job.out = &out[0, 0]
    job.rstd = &rstd[0, 0]
    job.ln = &ln[0]
    job.bias = NULL if bias is None else &bias[0]
    run_parts(_normalise_job, &job, &job.rows[0][0], 2, parts)


cdef void _normalise_back_part(RowsJob* j, int part, floating* dy, const floating* ahat,
                               const floating* rstd, const floating* ln) noexcept nogil:
    cdef Py_ssize_t r, d, k, GH = j.GH, dirs = j.dirs
    cdef floating* row
    cdef const floating* gain
    for r in range(j.rows[part][0], j.rows[part][1]):
        for d in range(dirs):
            row = dy + (r * dirs + d) * GH
            gain = ln + d * j.P
            for k in range(GH):
                row[k] = row[k] * gain[k]
            _normalise_backward(row, ahat + (r * dirs + d) * GH, rstd[r * dirs + d], GH, row)


cdef void _normalise_back_job(void* arg, int part) noexcept nogil:
    cdef RowsJob* j = <RowsJob*>arg
    if j.is_double:
        _normalise_back_part(j, part, <double*>j.a, <const double*>j.ahat,
                             <const double*>j.rstd, <const double*>j.ln)
    else:
        _normalise_back_part(j, part, <float*>j.a, <const float*>j.ahat,
                             <const float*>j.rstd, <const float*>j.ln)


def normalise_rows_backward(*, floating[:, ::1] dy not None, const floating[:, ::1] ahat not None,
                            const floating[:, ::1] rstd not None, const floating[::1] ln not None,
                            Py_ssize_t P, parts):
    """The input-side LN backward, in place: dy's block of each row and
    direction, the gradient of LN(W_ih x)'s output, becomes that of W_ih x
    (ahat the normalised values, rstd their 1 / std, ln the parameters).
    ``parts``: ranges of rows (r0, r1), one per thread."""
    cdef RowsJob job
    cdef Py_ssize_t R = dy.shape[0]
    job.dirs = rstd.shape[1]
    if R == 0:
        return
    job.GH = dy.shape[1] // job.dirs
    if (rstd.shape[0] != R or ahat.shape[0] != R or ahat.shape[1] != dy.shape[1]
            or ln.shape[0] < job.dirs * P or P < 2 * job.GH):
        raise ValueError("layer norm kernel: the buffers do not fit the layer")
    job.is_double = floating is double
    job.P = P
    job.a = &dy[0, 0]
    job.ahat = &ahat[0, 0]
    job.rstd = <void*>&rstd[0, 0]
    job.ln = &ln[0]
    run_parts(_normalise_back_job, &job, &job.rows[0][0], 2, parts)


# --- the time loops ---

cdef struct LNJob:
    int kind
    bint is_double, train
    Py_ssize_t T, B, H, G, dirs, row_t, row_b, P, W
    const void* gx          # (R, dirs * GH): input side, normalised, biases added
    const void* w_hh        # (dirs * GH, H)
    const void* ln          # (dirs * P,)
    const void* bias_h      # GRU: b_hh (dirs * GH) or NULL
    void* h                 # (dirs, B, H)
    void* c                 # (dirs, B, H) LSTM, else NULL
    void* out               # (R, dirs * H)
    void* hhat
    void* acts
    void* rstd
    void* h_prev            # training: (R, dirs * H)
    void* c_prev
    void* work              # (dirs * B, W): one row per direction and batch row
    # backward only
    const void* dout        # (R, dirs * H)
    void* dh                # (dirs, B, H)
    void* dc
    void* dpre_x            # (R, dirs * GH): gradient of the input side's output
    void* dpre_h            # GRU: (R, dirs * GH) gradient of gh; LSTM: NULL (= dpre_x)
    void* da_h              # (R, dirs * GH): gradient of W_hh h
    void* dlnc              # LSTM: (R, dirs * H) gradient of LN(c')'s output
    const int64_t* lengths
    Py_ssize_t ranges[MAX_PARTS][4]   # per part: d_lo, d_hi, b_lo, b_hi
    Interrupt interrupt
    bint has_packed
    Packed packed[2]        # float32: W_hh per direction (forward: pack_recurrent;
                            # backward: pack_rows of its rows, K = G * H)


cdef inline void _lstm_row(const floating* gx, floating* pre, const floating* hhat,
                           const floating* ln, Py_ssize_t H, floating* h, floating* c,
                           floating* out, floating* acts, floating* rstd_c) noexcept nogil:
    """One LSTM row after the recurrent LN: pre (4H scratch), the saved acts,
    the new h, c (in place) and the output."""
    cdef Py_ssize_t GH = 4 * H, j
    cdef const floating* a_hh = ln + 2 * GH
    cdef const floating* b_hh = ln + 3 * GH
    cdef const floating* a_c = ln + 4 * GH
    cdef const floating* b_c = a_c + H
    cdef floating tc
    for j in range(GH):
        pre[j] = gx[j] + a_hh[j] * hhat[j] + b_hh[j]
    lstm_activations(pre, acts, H, H)
    for j in range(H):
        acts[4 * H + j] = acts[H + j] * c[j] + acts[j] * acts[2 * H + j]
    rstd_c[0] = _normalise(acts + 4 * H, H, acts + 5 * H)
    for j in range(H):
        tc = tanh_(a_c[j] * acts[5 * H + j] + b_c[j])
        acts[6 * H + j] = tc
        c[j] = acts[4 * H + j]
        h[j] = acts[3 * H + j] * tc
        out[j] = h[j]


cdef inline void _gru_row(const floating* gx, floating* gh, const floating* hhat,
                          const floating* ln, const floating* bias_h, Py_ssize_t H,
                          floating* h, floating* out, floating* acts) noexcept nogil:
    """One GRU row (reset after) after the recurrent LN: gh (3H scratch) =
    a_hh * hhat + b_hh (+ the GRU's b_hh), then the plain GRU's gate pass
    (_gates.gru_row), which saves r, z, n and gh_n."""
    cdef Py_ssize_t GH = 3 * H, j
    cdef const floating* a_hh = ln + 2 * GH
    cdef const floating* b_hh = ln + 3 * GH
    if bias_h != NULL:
        for j in range(GH):
            gh[j] = a_hh[j] * hhat[j] + b_hh[j] + bias_h[j]
    else:
        for j in range(GH):
            gh[j] = a_hh[j] * hhat[j] + b_hh[j]
    gru_row(gx, gh, h, h, out, acts, H, H)


cdef void _forward_direction(LNJob* j, Py_ssize_t d, Py_ssize_t b_lo, Py_ssize_t b_hi,
                             const floating* gx, const floating* w_hh, const floating* ln,
                             const floating* bias_h, floating* h, floating* c, floating* out,
                             floating* hhat, floating* acts, floating* rstd, floating* h_prev,
                             floating* c_prev, floating* work) noexcept nogil:
    """Direction d, batch rows [b_lo, b_hi), every step. The pointers are
    the whole buffers'; h, c, work already at this direction's first row."""
    cdef Py_ssize_t H = j.H, dirs = j.dirs, T = j.T, M = b_hi - b_lo
    cdef Py_ssize_t GH = j.G * H, A = (7 if j.kind == KIND_LSTM else 4) * H
    cdef Py_ssize_t s, t, b, row, saved
    cdef floating* wrow
    for s in range(T):
        if interrupted(&j.interrupt):
            return
        t = T - 1 - s if d == 1 else s
        if j.train:   # the state this step starts from
            for b in range(b_lo, b_hi):
                row = t * j.row_t + b * j.row_b
                memcpy(h_prev + row * dirs * H + d * H, h + (b - b_lo) * H, H * sizeof(floating))
                if c != NULL:
                    memcpy(c_prev + row * dirs * H + d * H, c + (b - b_lo) * H,
                           H * sizeof(floating))
        # the recurrent product of every row of the range: work (M, GH) = h @ W_hh^T
        if floating is float and j.has_packed:
            packed_product(M, h, H, 1, &j.packed[d], work, j.W, H, FASTRNN_MK_ZERO, NULL)
        else:
            gemm(False, True, <int>M, <int>GH, <int>H, <floating>1, h, <int>H,
                 w_hh + d * GH * H, <int>H, <floating>0, work, <int>j.W)
        for b in range(b_lo, b_hi):
            row = t * j.row_t + b * j.row_b
            if j.lengths != NULL and t >= j.lengths[b]:
                memset(out + row * dirs * H + d * H, 0, H * sizeof(floating))
                if j.train:   # the sums over rows of BPTT read these (times 0)
                    memset(hhat + row * dirs * GH + d * GH, 0, GH * sizeof(floating))
                    memset(acts + row * dirs * A + d * A, 0, A * sizeof(floating))
                    rstd[row * dirs * 2 + d * 2] = 0
                    rstd[row * dirs * 2 + d * 2 + 1] = 0
                continue
            saved = row if j.train else b
            wrow = work + (b - b_lo) * j.W
            rstd[saved * dirs * 2 + d * 2] = _normalise(wrow, GH, hhat + saved * dirs * GH + d * GH)
            if j.kind == KIND_LSTM:
                _lstm_row(gx + row * dirs * GH + d * GH, wrow, hhat + saved * dirs * GH + d * GH,
                          ln + d * j.P, H, h + (b - b_lo) * H, c + (b - b_lo) * H,
                          out + row * dirs * H + d * H, acts + saved * dirs * A + d * A,
                          rstd + saved * dirs * 2 + d * 2 + 1)
            else:
                _gru_row(gx + row * dirs * GH + d * GH, wrow, hhat + saved * dirs * GH + d * GH,
                         ln + d * j.P, NULL if bias_h == NULL else bias_h + d * GH, H,
                         h + (b - b_lo) * H, out + row * dirs * H + d * H,
                         acts + saved * dirs * A + d * A)


cdef void _forward_part(LNJob* j, int part, const floating* gx, const floating* w_hh,
                        const floating* ln, const floating* bias_h, floating* h, floating* c,
                        floating* out, floating* hhat, floating* acts, floating* rstd,
                        floating* h_prev, floating* c_prev, floating* work) noexcept nogil:
    cdef Py_ssize_t d_lo = j.ranges[part][0], d_hi = j.ranges[part][1]
    cdef Py_ssize_t b_lo = j.ranges[part][2], b_hi = j.ranges[part][3]
    cdef Py_ssize_t d, B = j.B, H = j.H
    cdef unsigned int fpenv
    if d_hi <= d_lo or b_hi <= b_lo:
        return
    fpenv = fastrnn_flush_denormals()
    for d in range(d_lo, d_hi):
        _forward_direction(j, d, b_lo, b_hi, gx, w_hh, ln, bias_h, h + (d * B + b_lo) * H,
                           NULL if c == NULL else c + (d * B + b_lo) * H, out, hhat, acts,
                           rstd, h_prev, c_prev, work + (d * B + b_lo) * j.W)
    fastrnn_restore_fpenv(fpenv)


cdef void _forward_job(void* arg, int part) noexcept nogil:
    cdef LNJob* j = <LNJob*>arg
    if j.is_double:
        _forward_part(j, part, <const double*>j.gx, <const double*>j.w_hh, <const double*>j.ln,
                      <const double*>j.bias_h, <double*>j.h, <double*>j.c, <double*>j.out,
                      <double*>j.hhat, <double*>j.acts, <double*>j.rstd, <double*>j.h_prev,
                      <double*>j.c_prev, <double*>j.work)
    else:
        _forward_part(j, part, <const float*>j.gx, <const float*>j.w_hh, <const float*>j.ln,
                      <const float*>j.bias_h, <float*>j.h, <float*>j.c, <float*>j.out,
                      <float*>j.hhat, <float*>j.acts, <float*>j.rstd, <float*>j.h_prev,
                      <float*>j.c_prev, <float*>j.work)


cdef int _common(LNJob* job, int kind, Py_ssize_t T, bint batch_first, floating[:, :, ::1] h,
                 floating[:, :, ::1] c, const floating[:, ::1] w_hh,
                 const floating[::1] ln, const floating[:, ::1] gx,
                 const int64_t[::1] lengths, floating[:, ::1] work) except -1:
    """The job's sizes and shared pointers, every shape checked (a mismatch
    is a bug of the caller, reported as ValueError, never memory misread)."""
    job.kind = kind
    job.is_double = floating is double
    job.T = T
    job.dirs = h.shape[0]
    job.B = h.shape[1]
    job.H = h.shape[2]
    job.G = 4 if kind == KIND_LSTM else 3
    job.P = 4 * job.G * job.H + (2 * job.H if kind == KIND_LSTM else 0)
    job.row_t = 1 if batch_first else job.B
    job.row_b = T if batch_first else 1
    job.W = work.shape[1]
    cdef Py_ssize_t GH = job.G * job.H, R = T * job.B
    if (kind not in (KIND_LSTM, KIND_GRU) or job.dirs not in (1, 2)
            or w_hh.shape[0] != job.dirs * GH or w_hh.shape[1] != job.H
            or ln.shape[0] != job.dirs * job.P or gx.shape[0] != R
            or gx.shape[1] != job.dirs * GH or work.shape[0] != job.dirs * job.B
            or job.W < GH or (kind == KIND_LSTM) != (c is not None)
            or (c is not None and (c.shape[0] != job.dirs or c.shape[1] != job.B
                                   or c.shape[2] != job.H))
            or (lengths is not None and lengths.shape[0] != job.B)):
        raise ValueError("layer norm kernel: the buffers do not fit the layer")
    job.gx = &gx[0, 0]
    job.w_hh = &w_hh[0, 0]
    job.ln = &ln[0]
    job.h = &h[0, 0, 0]
    job.c = NULL if c is None else &c[0, 0, 0]
    job.work = &work[0, 0]
    job.lengths = NULL if lengths is None else &lengths[0]
    return 0


cdef int _check_rows(object a, Py_ssize_t rows, Py_ssize_t cols, str name) except -1:
    """A buffer of the caller must be (rows, cols)."""
    if a is None or a.shape[0] != rows or a.shape[1] != cols:
        raise ValueError(f"layer norm kernel: {name} does not fit the layer")
    return 0


def recur(*, int kind, Py_ssize_t T, bint batch_first, parts,
          const floating[:, ::1] w_hh not None, const floating[::1] ln not None,
          const floating[::1] bias_h, floating[:, :, ::1] h not None, floating[:, :, ::1] c,
          const floating[:, ::1] gx not None, floating[:, ::1] out not None,
          const int64_t[::1] lengths, bint train, floating[:, ::1] hhat not None,
          floating[:, ::1] acts not None, floating[:, ::1] rstd not None,
          floating[:, ::1] h_prev, floating[:, ::1] c_prev, floating[:, ::1] work not None,
          packed=None):
    """The time loops of one layer-normalised layer after ``normalise_rows``
    (gx: the input side, normalised, biases added), in the plan's ``parts``
    (d_lo, d_hi, b_lo, b_hi); a second part runs on the worker thread.

    h, c (dirs, B, H): the initial state in, the final state out (c: LSTM
    only). bias_h: the GRU's b_hh (else None: the LSTM folds it into gx).
    hhat, acts, rstd: see the module comment, (R, .) in training, (B, .)
    in inference; h_prev, c_prev (R, dirs * H) in training, else None.
    work (dirs * B, >= G * H) scratch. packed (float32): _forward's
    pack_recurrent arrays, one per direction; None: BLAS.
    """
    cdef LNJob job
    cdef Py_ssize_t d, A, rows
    if T == 0 or h.shape[1] == 0:
        return
    _common(&job, kind, T, batch_first, h, c, w_hh, ln, gx, lengths, work)
    A = (7 if kind == KIND_LSTM else 4) * job.H
    rows = T * job.B if train else job.B
    job.train = train
    _check_rows(out, T * job.B, job.dirs * job.H, "out")
    _check_rows(hhat, rows, job.dirs * job.G * job.H, "hhat")
    _check_rows(acts, rows, job.dirs * A, "acts")
    _check_rows(rstd, rows, job.dirs * 2, "rstd")
    if train:
        _check_rows(h_prev, T * job.B, job.dirs * job.H, "h_prev")
        if kind == KIND_LSTM:
            _check_rows(c_prev, T * job.B, job.dirs * job.H, "c_prev")
    if bias_h is not None and (kind != KIND_GRU or bias_h.shape[0] != job.dirs * job.G * job.H):
        raise ValueError("layer norm kernel: bias_h does not fit the layer")
    job.bias_h = NULL if bias_h is None else &bias_h[0]
    job.out = &out[0, 0]
    job.hhat = &hhat[0, 0]
    job.acts = &acts[0, 0]
    job.rstd = &rstd[0, 0]
    job.h_prev = NULL if not train else &h_prev[0, 0]
    job.c_prev = NULL if not train or c_prev is None else &c_prev[0, 0]
    job.has_packed = False
    if floating is float and packed is not None:
        if len(packed) != job.dirs:
            raise ValueError("layer norm kernel: packed does not fit the layer")
        for d in range(job.dirs):
            describe_packed(&job.packed[d], packed[d], job.H, job.H, <int>job.G)
        job.has_packed = True
    run_parts(_forward_job, &job, &job.ranges[0][0], 4, parts, &job.interrupt)


# --- BPTT ---

cdef inline void _lstm_back_row(const floating* acts, const floating* hhat, floating rstd_h,
                                floating rstd_c, const floating* c_prev, const floating* ln,
                                Py_ssize_t H, floating* dh, floating* dc,
                                floating* dpre, floating* da_h, floating* dlnc,
                                floating* tmp) noexcept nogil:
    """One LSTM row backward. In: dh (H; the output's gradient already
    added), dc (H). Out: dpre (4H: the gradient of every gate's
    pre-activation, hence of both LN outputs and both biases), dlnc (H),
    da_h (4H: of W_hh h); dc becomes that of c_{t-1}, dh is zeroed (the
    product with W_hh adds the rest). tmp: H scratch."""
    cdef Py_ssize_t GH = 4 * H, j
    cdef const floating* a_hh = ln + 2 * GH
    cdef const floating* a_c = ln + 4 * GH
    cdef floating i, f, g, o, tc, dcell
    for j in range(H):
        o = acts[3 * H + j]
        tc = acts[6 * H + j]
        dpre[3 * H + j] = dh[j] * tc * o * (1 - o)
        dlnc[j] = dh[j] * o * (1 - tc * tc)
        tmp[j] = dlnc[j] * a_c[j]
        dh[j] = 0
    _normalise_backward(tmp, acts + 5 * H, rstd_c, H, tmp)
    for j in range(H):
        i = acts[j]
        f = acts[H + j]
        g = acts[2 * H + j]
        dcell = tmp[j] + dc[j]
        dpre[j] = dcell * g * i * (1 - i)
        dpre[H + j] = dcell * c_prev[j] * f * (1 - f)
        dpre[2 * H + j] = dcell * i * (1 - g * g)
        dc[j] = dcell * f
    for j in range(GH):
        da_h[j] = dpre[j] * a_hh[j]
    _normalise_backward(da_h, hhat, rstd_h, GH, da_h)


cdef inline void _gru_back_row(const floating* acts, const floating* hhat, floating rstd_h,
                               const floating* h_prev, const floating* ln, Py_ssize_t H,
                               floating* dh, floating* dpre_x, floating* dpre_h,
                               floating* da_h) noexcept nogil:
    """One GRU row backward: dh (H, the output's gradient added) becomes the
    direct part of h_{t-1}'s (z * dh); dpre_x, dpre_h (3H) the gradients of
    the input and recurrent sides' outputs, da_h (3H) that of W_hh h."""
    cdef Py_ssize_t GH = 3 * H, j
    cdef const floating* a_hh = ln + 2 * GH
    cdef floating r, z, n, dn, dz, dr
    for j in range(H):
        r = acts[j]
        z = acts[H + j]
        n = acts[2 * H + j]
        dn = dh[j] * (1 - z) * (1 - n * n)
        dz = dh[j] * (h_prev[j] - n) * z * (1 - z)
        dr = dn * acts[3 * H + j] * r * (1 - r)
        dpre_x[j] = dr
        dpre_x[H + j] = dz
        dpre_x[2 * H + j] = dn
        dpre_h[j] = dr
        dpre_h[H + j] = dz
        dpre_h[2 * H + j] = dn * r
        dh[j] = dh[j] * z
    for j in range(GH):
        da_h[j] = dpre_h[j] * a_hh[j]
    _normalise_backward(da_h, hhat, rstd_h, GH, da_h)


cdef void _backward_direction(LNJob* j, Py_ssize_t d, Py_ssize_t b_lo, Py_ssize_t b_hi,
                              const floating* w_hh, const floating* ln, const floating* hhat,
                              const floating* acts, const floating* rstd,
                              const floating* h_prev, const floating* c_prev,
                              const floating* dout, floating* dh, floating* dc,
                              floating* dpre_x, floating* dpre_h, floating* da_h,
                              floating* dlnc, floating* work) noexcept nogil:
    """Direction d, batch rows [b_lo, b_hi), every step backward; dh, dc and
    work at this direction's first row, the rest the whole buffers."""
    cdef Py_ssize_t H = j.H, dirs = j.dirs, T = j.T, M = b_hi - b_lo
    cdef Py_ssize_t GH = j.G * H, A = (7 if j.kind == KIND_LSTM else 4) * H
    cdef Py_ssize_t s, t, b, k, row
    cdef floating* wrow
    cdef floating* dh_b
    for s in range(T):
        if interrupted(&j.interrupt):
            return
        t = s if d == 1 else T - 1 - s
        for b in range(b_lo, b_hi):
            row = t * j.row_t + b * j.row_b
            wrow = work + (b - b_lo) * j.W
            if j.lengths != NULL and t >= j.lengths[b]:
                memset(wrow, 0, GH * sizeof(floating))
                memset(dpre_x + row * dirs * GH + d * GH, 0, GH * sizeof(floating))
                memset(da_h + row * dirs * GH + d * GH, 0, GH * sizeof(floating))
                if dpre_h != NULL:
                    memset(dpre_h + row * dirs * GH + d * GH, 0, GH * sizeof(floating))
                if dlnc != NULL:
                    memset(dlnc + row * dirs * H + d * H, 0, H * sizeof(floating))
                continue
            dh_b = dh + (b - b_lo) * H
            for k in range(H):
                dh_b[k] = dh_b[k] + dout[row * dirs * H + d * H + k]
            if j.kind == KIND_LSTM:
                _lstm_back_row(acts + row * dirs * A + d * A, hhat + row * dirs * GH + d * GH,
                               rstd[row * dirs * 2 + d * 2], rstd[row * dirs * 2 + d * 2 + 1],
                               c_prev + row * dirs * H + d * H, ln + d * j.P, H, dh_b,
                               dc + (b - b_lo) * H, dpre_x + row * dirs * GH + d * GH,
                               da_h + row * dirs * GH + d * GH, dlnc + row * dirs * H + d * H,
                               wrow + GH)
            else:
                _gru_back_row(acts + row * dirs * A + d * A, hhat + row * dirs * GH + d * GH,
                              rstd[row * dirs * 2 + d * 2], h_prev + row * dirs * H + d * H,
                              ln + d * j.P, H, dh_b, dpre_x + row * dirs * GH + d * GH,
                              dpre_h + row * dirs * GH + d * GH,
                              da_h + row * dirs * GH + d * GH)
            memcpy(wrow, da_h + row * dirs * GH + d * GH, GH * sizeof(floating))
        # dh (M, H) += work (M, GH) @ W_hh (GH, H); inactive rows add zeros
        if floating is float and j.has_packed:
            packed_product(M, work, j.W, 1, &j.packed[d], dh, H, H, FASTRNN_MK_FROM_C, NULL)
        else:
            gemm(False, False, <int>M, <int>H, <int>GH, <floating>1, work, <int>j.W,
                 w_hh + d * GH * H, <int>H, <floating>1, dh, <int>H)


cdef void _backward_part(LNJob* j, int part, const floating* w_hh, const floating* ln,
                         const floating* hhat, const floating* acts, const floating* rstd,
                         const floating* h_prev, const floating* c_prev,
                         const floating* dout, floating* dh, floating* dc, floating* dpre_x,
                         floating* dpre_h, floating* da_h, floating* dlnc,
                         floating* work) noexcept nogil:
    cdef Py_ssize_t d_lo = j.ranges[part][0], d_hi = j.ranges[part][1]
    cdef Py_ssize_t b_lo = j.ranges[part][2], b_hi = j.ranges[part][3]
    cdef Py_ssize_t d, B = j.B, H = j.H
    cdef unsigned int fpenv
    if d_hi <= d_lo or b_hi <= b_lo:
        return
    fpenv = fastrnn_flush_denormals()
    for d in range(d_lo, d_hi):
        _backward_direction(j, d, b_lo, b_hi, w_hh, ln, hhat, acts, rstd, h_prev, c_prev, dout,
                            dh + (d * B + b_lo) * H,
                            NULL if dc == NULL else dc + (d * B + b_lo) * H,
                            dpre_x, dpre_h, da_h, dlnc, work + (d * B + b_lo) * j.W)
    fastrnn_restore_fpenv(fpenv)


cdef void _backward_job(void* arg, int part) noexcept nogil:
    cdef LNJob* j = <LNJob*>arg
    if j.is_double:
        _backward_part(j, part, <const double*>j.w_hh, <const double*>j.ln,
                       <const double*>j.hhat, <const double*>j.acts, <const double*>j.rstd,
                       <const double*>j.h_prev, <const double*>j.c_prev,
                       <const double*>j.dout, <double*>j.dh, <double*>j.dc,
                       <double*>j.dpre_x, <double*>j.dpre_h, <double*>j.da_h,
                       <double*>j.dlnc, <double*>j.work)
    else:
        _backward_part(j, part, <const float*>j.w_hh, <const float*>j.ln,
                       <const float*>j.hhat, <const float*>j.acts, <const float*>j.rstd,
                       <const float*>j.h_prev, <const float*>j.c_prev,
                       <const float*>j.dout, <float*>j.dh, <float*>j.dc,
                       <float*>j.dpre_x, <float*>j.dpre_h, <float*>j.da_h,
                       <float*>j.dlnc, <float*>j.work)


def backward(*, int kind, Py_ssize_t T, bint batch_first, parts,
             const floating[:, ::1] w_hh not None, const floating[::1] ln not None,
             const floating[:, ::1] hhat not None, const floating[:, ::1] acts not None,
             const floating[:, ::1] rstd not None, const floating[:, ::1] h_prev not None,
             const floating[:, ::1] c_prev, const floating[:, ::1] dout not None,
             floating[:, :, ::1] dh not None, floating[:, :, ::1] dc,
             floating[:, ::1] dpre_x not None, floating[:, ::1] dpre_h,
             floating[:, ::1] da_h not None, floating[:, ::1] dlnc,
             const int64_t[::1] lengths, floating[:, ::1] work not None, packed=None):
    """The backward time loops of one layer-normalised layer, in ``parts``.

    The forward's saves (hhat, acts, rstd, h_prev, c_prev; R rows) and dout
    (R, dirs * H) in; dh, dc (dirs, B, H) the final state's gradients in,
    the initial state's out. Out, per row (zero on padding): dpre_x (R,
    dirs * G * H) the gradient of the input side's output (LN(W_ih x) + b),
    dpre_h (GRU) that of the recurrent side's (LSTM: None, it is dpre_x),
    da_h that of W_hh h, dlnc (LSTM, (R, dirs * H)) that of LN(c')'s
    output. work (dirs * B, >= G * H + H) scratch. packed (float32):
    _backward.pack_rows of each direction's W_hh rows; None: BLAS.
    """
    cdef LNJob job
    cdef Py_ssize_t d, R
    if T == 0 or dh.shape[1] == 0:
        return
    _common(&job, kind, T, batch_first, dh, dc, w_hh, ln, dpre_x, lengths, work)
    R = T * job.B
    job.train = True
    _check_rows(hhat, R, job.dirs * job.G * job.H, "hhat")
    _check_rows(acts, R, job.dirs * (7 if kind == KIND_LSTM else 4) * job.H, "acts")
    _check_rows(rstd, R, job.dirs * 2, "rstd")
    _check_rows(h_prev, R, job.dirs * job.H, "h_prev")
    _check_rows(dout, R, job.dirs * job.H, "dout")
    _check_rows(da_h, R, job.dirs * job.G * job.H, "da_h")
    if kind == KIND_LSTM:
        _check_rows(c_prev, R, job.dirs * job.H, "c_prev")
        _check_rows(dlnc, R, job.dirs * job.H, "dlnc")
        if work.shape[1] < job.G * job.H + job.H:
            raise ValueError("layer norm kernel: work does not fit the layer")
    else:
        _check_rows(dpre_h, R, job.dirs * job.G * job.H, "dpre_h")
    # read only here (the struct's fields are the forward's, which writes them)
    job.hhat = <void*>&hhat[0, 0]
    job.acts = <void*>&acts[0, 0]
    job.rstd = <void*>&rstd[0, 0]
    job.h_prev = <void*>&h_prev[0, 0]
    job.c_prev = NULL if c_prev is None else <void*>&c_prev[0, 0]
    job.dout = &dout[0, 0]
    job.dh = &dh[0, 0, 0]
    job.dc = NULL if dc is None else &dc[0, 0, 0]
    job.dpre_x = &dpre_x[0, 0]
    job.dpre_h = NULL if dpre_h is None else &dpre_h[0, 0]
    job.da_h = &da_h[0, 0]
    job.dlnc = NULL if dlnc is None else &dlnc[0, 0]
    job.has_packed = False
    if floating is float and packed is not None:
        if len(packed) != job.dirs:
            raise ValueError("layer norm kernel: packed does not fit the layer")
        for d in range(job.dirs):
            describe_packed(&job.packed[d], packed[d], job.G * job.H, job.H, 1)
        job.has_packed = True
    run_parts(_backward_job, &job, &job.ranges[0][0], 4, parts, &job.interrupt)
