# Backward kernels (BPTT) of a layer, for a range of directions and batch
# rows (two ranges may run in parallel threads), in the layout of _forward.pyx (R = T * B rows in the input's order, direction d owns a
# column block of each buffer).
#
# The time loop does only what must be sequential: per step the elementwise
# backward of every row, writing the pre-activation gradients dG_t, and
# dh_prev = dG_t . W_hh (a gemv at batch 1). Everything else is one large
# GEMM or reduction over all R rows after the loop (weight_grads,
# input_grad): dW_ih = dGx^T X, dW_hh = dGh^T H_prev, db = column sums,
# dX = dGx W_ih.
#
# GRU: the input side and the recurrent side of n differ (r multiplies only
# the recurrent part), so the GRU has two gradient buffers, dgx and dgh;
# for the other cells they are the same buffer. The reset-before GRU needs
# d(r * h) = dG_n W_hn before it has dG_r: a product between two passes
# over the rows, parked in dG_r's own columns.

from cython cimport floating
from libc.stdint cimport int64_t
from libc.string cimport memset

from fastrnn._blas cimport gemm, gemv, step_block
from fastrnn._gates cimport (RNN_TANH, GRU, LSTM, GRU_RESET_BEFORE, num_gates, num_saved,
                             axpy_product,
                             AXPY_MAX,
                             tanh_, fastrnn_flush_denormals, fastrnn_restore_fpenv)


# Per-row elementwise backward. dh holds dL/dh_t on entry (carried plus this
# step's output gradient) and the part of dL/dh_{t-1} that does not go
# through W_hh on exit (the GEMM adds the rest). dc likewise for the LSTM.

cdef inline void _rnn_tanh_back(const floating* acts, floating* dh, floating* dg,
                                Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(H):
        dg[j] = dh[j] * (<floating>1 - acts[j] * acts[j])
        dh[j] = 0


cdef inline void _rnn_relu_back(const floating* acts, floating* dh, floating* dg,
                                Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(H):
        dg[j] = dh[j] if acts[j] > 0 else 0
        dh[j] = 0


cdef inline void _gru_back(const floating* acts, const floating* h_prev, floating* dh,
                           floating* dgx, floating* dgh, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating r, z, n, hn, d, dn, dz, dr
    for j in range(H):
        r = acts[j]
        z = acts[H + j]
        n = acts[2 * H + j]
        hn = acts[3 * H + j]
        d = dh[j]
        dn = d * (<floating>1 - z) * (<floating>1 - n * n)
        dz = d * (h_prev[j] - n) * z * (<floating>1 - z)
        dr = dn * hn * r * (<floating>1 - r)
        dgx[j] = dr
        dgx[H + j] = dz
        dgx[2 * H + j] = dn
        dgh[j] = dr
        dgh[H + j] = dz
        dgh[2 * H + j] = dn * r
        dh[j] = d * z


cdef inline void _gru_reset_back_zn(const floating* acts, const floating* h_prev,
                                   floating* dh, floating* dg, Py_ssize_t H) noexcept nogil:
    """Reset-before GRU, first pass: dG_z, dG_n; dG_r zeroed for the product
    that fills it with d(r * h)."""
    cdef Py_ssize_t j
    cdef floating z, n, d
    for j in range(H):
        z = acts[H + j]
        n = acts[2 * H + j]
        d = dh[j]
        dg[j] = 0
        dg[H + j] = d * (h_prev[j] - n) * z * (<floating>1 - z)
        dg[2 * H + j] = d * (<floating>1 - z) * (<floating>1 - n * n)
        dh[j] = d * z


cdef inline void _gru_reset_back_r(const floating* acts, const floating* h_prev,
                                   floating* dh, floating* dg, Py_ssize_t H) noexcept nogil:
    """Second pass: dG_r from d(r * h), which dG_r's columns hold."""
    cdef Py_ssize_t j
    cdef floating r, drh
    for j in range(H):
        r = acts[j]
        drh = dg[j]
        dg[j] = drh * h_prev[j] * r * (<floating>1 - r)
        dh[j] += drh * r


cdef inline void _lstm_back(const floating* acts, const floating* c_prev, floating* dh,
                            floating* dc, floating* dg, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating i, f, g, o, tc, d, dc_t
    for j in range(H):
        i = acts[j]
        f = acts[H + j]
        g = acts[2 * H + j]
        o = acts[3 * H + j]
        tc = tanh_(f * c_prev[j] + i * g)   # tanh(c_t), recomputed
        d = dh[j]
        dc_t = dc[j] + d * o * (<floating>1 - tc * tc)
        dg[j] = dc_t * g * i * (<floating>1 - i)
        dg[H + j] = dc_t * c_prev[j] * f * (<floating>1 - f)
        dg[2 * H + j] = dc_t * i * (<floating>1 - g * g)
        dg[3 * H + j] = d * tc * o * (<floating>1 - o)
        dc[j] = dc_t * f
        dh[j] = 0


cdef void _recurrent_grad(Py_ssize_t B, Py_ssize_t GH, Py_ssize_t H,
                          const floating* dg, Py_ssize_t ldg, const floating* w_hh,
                          floating* dh, Py_ssize_t ldh, Py_ssize_t cols) noexcept nogil:
    """dh (B, H; rows ldh apart) += dg (B, GH; rows ldg apart) @ w_hh (GH, H), summed over
    blocks of ``cols`` gates per BLAS call (see _blas.step_block)."""
    cdef Py_ssize_t start, n
    cdef floating one = 1
    if B == 1 and GH * H <= AXPY_MAX:
        axpy_product(dg, GH, w_hh, H, H, dh)
        return
    start = 0
    while start < GH:
        n = min(cols, GH - start)
        if B == 1:
            gemv(True, <int>n, <int>H, one, w_hh + start * H, <int>H, dg + start, one, dh)
        else:
            gemm(False, False, <int>B, <int>H, <int>n, one, dg + start, <int>ldg,
                 w_hh + start * H, <int>H, one, dh, <int>ldh)
        start += n


cdef void _back_direction(int cell, bint reverse, Py_ssize_t T, Py_ssize_t B,
                          Py_ssize_t H, Py_ssize_t dirs,
                          Py_ssize_t row_t, Py_ssize_t row_b,
                          const floating* acts, const floating* h_prev,
                          const floating* c_prev, const floating* w_hh,
                          const floating* dout, floating* dh, floating* dc,
                          floating* dgx, floating* dgh,
                          const int64_t* lengths, Py_ssize_t cols) noexcept nogil:
    """One direction, steps in the reverse of the forward order; pointers are
    offset to this direction's column block."""
    cdef Py_ssize_t GH = num_gates(cell) * H
    cdef Py_ssize_t g_cols = dirs * GH
    cdef Py_ssize_t h_cols = dirs * H
    cdef Py_ssize_t a_cols = dirs * num_saved(cell) * H
    cdef Py_ssize_t s, t, b, j, row
    cdef floating* dh_b
    cdef const floating* dout_row
    for s in range(T):
        t = s if reverse else T - 1 - s
        for b in range(B):
            row = t * row_t + b * row_b
            if lengths != NULL and t >= lengths[b]:
                # the state passed through this step unchanged: so does dh
                memset(dgx + row * g_cols, 0, GH * sizeof(floating))
                if dgh != dgx:
                    memset(dgh + row * g_cols, 0, GH * sizeof(floating))
                continue
            dh_b = dh + b * H
            dout_row = dout + row * h_cols
            for j in range(H):
                dh_b[j] += dout_row[j]
            if cell == LSTM:
                _lstm_back(acts + row * a_cols, c_prev + row * h_cols, dh_b, dc + b * H,
                           dgx + row * g_cols, H)
            elif cell == GRU:
                _gru_back(acts + row * a_cols, h_prev + row * h_cols, dh_b,
                          dgx + row * g_cols, dgh + row * g_cols, H)
            elif cell == GRU_RESET_BEFORE:
                _gru_reset_back_zn(acts + row * a_cols, h_prev + row * h_cols, dh_b,
                                   dgx + row * g_cols, H)
            elif cell == RNN_TANH:
                _rnn_tanh_back(acts + row * a_cols, dh_b, dgx + row * g_cols, H)
            else:
                _rnn_relu_back(acts + row * a_cols, dh_b, dgx + row * g_cols, H)
        if cell == GRU_RESET_BEFORE:
            # d(r * h) = dG_n W_hn into dG_r's columns, then dG_r itself
            _recurrent_grad(B, H, H, dgx + t * row_t * g_cols + 2 * H, row_b * g_cols,
                            w_hh + 2 * H * H, dgx + t * row_t * g_cols, row_b * g_cols, cols)
            for b in range(B):
                if lengths != NULL and t >= lengths[b]:
                    continue
                row = t * row_t + b * row_b
                _gru_reset_back_r(acts + row * a_cols, h_prev + row * h_cols, dh + b * H,
                                  dgx + row * g_cols, H)
            _recurrent_grad(B, 2 * H, H, dgx + t * row_t * g_cols, row_b * g_cols, w_hh, dh,
                            H, cols)
        else:
            _recurrent_grad(B, GH, H, dgh + t * row_t * g_cols, row_b * g_cols, w_hh, dh,
                            H, cols)


def backward_layer(*, int cell, Py_ssize_t T, bint batch_first,
                   Py_ssize_t d_lo, Py_ssize_t d_hi, Py_ssize_t b_lo, Py_ssize_t b_hi,
                   const floating[:, ::1] acts not None,
                   const floating[:, ::1] h_prev not None,
                   const floating[:, ::1] c_prev,
                   const floating[:, ::1] w_hh not None,
                   const floating[:, ::1] dout not None,
                   floating[:, :, ::1] dh not None,
                   floating[:, :, ::1] dc,
                   floating[:, ::1] dgx not None,
                   floating[:, ::1] dgh,
                   const int64_t[::1] lengths,
                   bint blas_held):
    """The BPTT time loops of directions [d_lo, d_hi), batch rows [b_lo, b_hi)
    of one layer; calls on disjoint ranges may run in parallel threads.

    acts, h_prev, c_prev: the forward's saves; w_hh (dirs * G * H, H);
    dout (R, dirs * H) the gradient of the layer's output; dh, dc (dirs, B, H)
    the gradient of the final state in, of the initial state out (dc None
    unless LSTM); dgx (R, dirs * G * H) pre-activation gradients out (zero on
    padded steps); dgh the same for the recurrent side (GRU) or None.
    blas_held: the caller holds BLAS at one thread (see _forward.recur).
    """
    cdef Py_ssize_t dirs = dh.shape[0]
    cdef Py_ssize_t B = dh.shape[1]
    cdef Py_ssize_t H = dh.shape[2]
    cdef Py_ssize_t GH = num_gates(cell) * H
    cdef Py_ssize_t S = num_saved(cell) * H
    cdef Py_ssize_t row_t = 1 if batch_first else B
    cdef Py_ssize_t row_b = T if batch_first else 1
    cdef Py_ssize_t first = b_lo * row_b    # the first row of this batch range
    cdef Py_ssize_t g_cols = dirs * GH
    cdef Py_ssize_t h_cols = dirs * H
    cdef Py_ssize_t d
    cdef const floating* c_prev_ptr = NULL if c_prev is None else &c_prev[0, 0]
    cdef floating* dc_ptr = NULL if dc is None else &dc[0, 0, 0]
    cdef floating* dgh_ptr = &dgx[0, 0] if dgh is None else &dgh[0, 0]
    cdef const int64_t* len_ptr = NULL if lengths is None else &lengths[0]
    cdef Py_ssize_t cols = step_block(b_hi - b_lo, H, GH, blas_held)
    cdef unsigned int fpenv
    if T == 0 or b_hi <= b_lo:
        return
    with nogil:
        fpenv = fastrnn_flush_denormals()
        for d in range(d_lo, d_hi):
            _back_direction(
                cell, d == 1, T, b_hi - b_lo, H, dirs, row_t, row_b,
                &acts[0, 0] + first * dirs * S + d * S,
                &h_prev[0, 0] + first * h_cols + d * H,
                NULL if c_prev_ptr == NULL else c_prev_ptr + first * h_cols + d * H,
                &w_hh[d * GH, 0], &dout[0, 0] + first * h_cols + d * H,
                &dh[d, b_lo, 0],
                NULL if dc_ptr == NULL else dc_ptr + (d * B + b_lo) * H,
                &dgx[0, 0] + first * g_cols + d * GH, dgh_ptr + first * g_cols + d * GH,
                NULL if len_ptr == NULL else len_ptr + b_lo, cols)
        fastrnn_restore_fpenv(fpenv)


cdef void _column_sums(const floating* a, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t lda,
                       floating* out, floating* out2) noexcept nogil:
    """out (cols,) += sum over rows of a (rows, cols; rows lda apart); the same
    sums added to out2 too unless it is NULL."""
    cdef Py_ssize_t r, j
    for r in range(rows):
        for j in range(cols):
            out[j] += a[r * lda + j]
        if out2 != NULL:
            for j in range(cols):
                out2[j] += a[r * lda + j]


def weight_grads(*, Py_ssize_t n_lo, Py_ssize_t n_hi,
                 const floating[:, ::1] x not None,
                 const floating[:, ::1] h_prev not None,
                 const floating[:, ::1] reset_acts,
                 const floating[:, ::1] dgx not None,
                 const floating[:, ::1] dgh,
                 floating[:, ::1] dw_ih not None,
                 floating[:, ::1] dw_hh not None,
                 floating[::1] db_ih,
                 floating[::1] db_hh,
                 Py_ssize_t max_rows):
    """Accumulate one layer's weight gradients over all steps for the gate
    columns [n_lo, n_hi) of N = dirs * G * H (rows of dw_ih and dw_hh):
    dw_ih += dgx^T x; dw_hh (per direction) += dgh^T h_prev; db_ih, db_hh +=
    column sums of dgx, dgh (biases None when absent; dgh None means dgx).
    The reset-before GRU passes its saved acts (R, dirs * 4H) as reset_acts:
    the rows of W_hn then take r * h from them instead of h_prev (None
    otherwise). Calls on disjoint column ranges may run in parallel threads.
    Sums over more than max_rows rows are chunked (BLAS int range)."""
    cdef Py_ssize_t R = x.shape[0]
    cdef Py_ssize_t D = x.shape[1]
    cdef Py_ssize_t N = dgx.shape[1]
    cdef Py_ssize_t H = dw_hh.shape[1]
    cdef Py_ssize_t dirs = h_prev.shape[1] // H
    cdef Py_ssize_t GH = N // dirs
    cdef Py_ssize_t d, start, n, lo, hi, n_gate
    cdef const floating* dgh_ptr = &dgx[0, 0] if dgh is None else &dgh[0, 0]
    cdef const floating* rh_ptr = NULL if reset_acts is None else &reset_acts[0, 0] + 3 * H
    cdef Py_ssize_t ld_rh = 0 if reset_acts is None else reset_acts.shape[1]
    cdef floating one = 1
    if R == 0 or n_hi <= n_lo:
        return
    with nogil:
        start = 0
        while start < R:
            n = min(max_rows, R - start)
            gemm(True, False, <int>(n_hi - n_lo), <int>D, <int>n, one,
                 &dgx[start, 0] + n_lo, <int>N, &x[start, 0], <int>D,
                 one, &dw_ih[n_lo, 0], <int>D)
            for d in range(dirs):
                # the part of [n_lo, n_hi) in direction d's block [d GH, (d + 1) GH)
                lo = max(n_lo, d * GH)
                hi = min(n_hi, (d + 1) * GH)
                # reset before: W_hn's rows [n_gate, (d + 1) GH) multiply r * h
                n_gate = hi if rh_ptr == NULL else max(lo, min(hi, d * GH + 2 * H))
                if n_gate > lo:
                    gemm(True, False, <int>(n_gate - lo), <int>H, <int>n, one,
                         dgh_ptr + start * N + lo, <int>N,
                         &h_prev[start, 0] + d * H, <int>(dirs * H),
                         one, &dw_hh[lo, 0], <int>H)
                if hi > n_gate:
                    gemm(True, False, <int>(hi - n_gate), <int>H, <int>n, one,
                         dgh_ptr + start * N + n_gate, <int>N,
                         rh_ptr + start * ld_rh + d * (ld_rh // dirs), <int>ld_rh,
                         one, &dw_hh[n_gate, 0], <int>H)
            start += n
    if db_ih is not None and db_hh is not None:
        with nogil:
            if dgh is None:  # b_hh's gradient is b_ih's: one pass for both
                _column_sums(&dgx[0, 0] + n_lo, R, n_hi - n_lo, N, &db_ih[n_lo], &db_hh[n_lo])
            else:
                _column_sums(&dgx[0, 0] + n_lo, R, n_hi - n_lo, N, &db_ih[n_lo], NULL)
                _column_sums(dgh_ptr + n_lo, R, n_hi - n_lo, N, &db_hh[n_lo], NULL)


def input_grad(*, const floating[:, ::1] dgx not None, const floating[:, ::1] w_ih not None,
               floating[:, ::1] dx not None, Py_ssize_t max_rows):
    """dx (R, D) = dgx (R, N) @ w_ih (N, D), in chunks of <= max_rows rows."""
    cdef Py_ssize_t R = dgx.shape[0]
    cdef Py_ssize_t N = dgx.shape[1]
    cdef Py_ssize_t D = w_ih.shape[1]
    cdef Py_ssize_t start = 0, n
    if R == 0:
        return
    with nogil:
        while start < R:
            n = min(max_rows, R - start)
            gemm(False, False, <int>n, <int>D, <int>N, <floating>1, &dgx[start, 0], <int>N,
                 &w_ih[0, 0], <int>D, <floating>0, &dx[start, 0], <int>D)
            start += n
