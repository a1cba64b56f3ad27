# Forward kernels: one call runs one layer (both directions) over a whole
# sequence, or one cell step (a layer with T = 1).
#
# Layout. The layer input x is a (R, D) block of rows, R = T * B, either
# time-major (row t * B + b) or batch-first (row b * T + t). The input
# projection of every row and both directions is one GEMM into gx, shape
# (R, dirs * G * H); the time loop then finds step t, batch b of direction d
# at gx + t * gx_stride_t + b * gx_stride_b + d * G * H, so batch-first input
# is never transposed. The output is addressed the same way.
#
# Per step: one recurrent product (gemv at batch 1) accumulated into the
# step's slice of gx (GRU: into a (B, 3H) workspace, because r multiplies
# only the recurrent part of n), then one fused pass over the rows.
# The state arrays h, c are updated in place and end as h_n, c_n.
#
# Variable lengths: row b is active at step t iff t < lengths[b]. An inactive
# row keeps its state and gets a zero output, which gives PyTorch's packed
# semantics in both directions (the reverse direction of a short sequence
# starts from h0 at its own last step).

from cython cimport floating
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

from fastrnn._blas cimport gemm, gemv
from fastrnn._gates cimport rnn_tanh_row, rnn_relu_row, gru_row, lstm_row

cdef enum:
    _RNN_TANH = 0
    _RNN_RELU = 1
    _GRU = 2
    _LSTM = 3

# exported to Python so that the cell codes are defined once
RNN_TANH = _RNN_TANH
RNN_RELU = _RNN_RELU
GRU = _GRU
LSTM = _LSTM


cdef inline Py_ssize_t _num_gates(int cell) noexcept nogil:
    if cell == _LSTM:
        return 4
    if cell == _GRU:
        return 3
    return 1


cdef void _project_inputs(const floating* x, Py_ssize_t rows, Py_ssize_t D,
                          const floating* w_ih, Py_ssize_t N,
                          const floating* bias, floating* gx,
                          Py_ssize_t max_rows) noexcept nogil:
    """gx (rows, N) = x (rows, D) @ w_ih^T + bias, in chunks of <= max_rows rows."""
    cdef Py_ssize_t r, start, n_rows
    cdef floating beta = 0
    if bias != NULL:
        beta = 1
        for r in range(rows):
            memcpy(gx + r * N, bias, N * sizeof(floating))
    start = 0
    while start < rows:
        n_rows = min(max_rows, rows - start)
        gemm(False, True, <int>n_rows, <int>N, <int>D, <floating>1,
             x + start * D, <int>D, w_ih, <int>D, beta, gx + start * N, <int>N)
        start += n_rows


cdef void _run_direction(int cell, bint reverse, Py_ssize_t T, Py_ssize_t B,
                         Py_ssize_t H,
                         floating* gx, Py_ssize_t gx_stride_t, Py_ssize_t gx_stride_b,
                         const floating* w_hh, const floating* b_hh,
                         floating* h, floating* c, floating* gh,
                         floating* out, Py_ssize_t out_stride_t,
                         Py_ssize_t out_stride_b,
                         const int64_t* lengths) noexcept nogil:
    cdef Py_ssize_t GH = _num_gates(cell) * H
    cdef Py_ssize_t s, t, b
    cdef floating* g_t
    cdef floating* out_t
    cdef floating* out_row
    cdef floating one = 1
    for s in range(T):
        t = T - 1 - s if reverse else s
        g_t = gx + t * gx_stride_t
        out_t = out + t * out_stride_t

        # recurrent product
        if cell == _GRU:
            for b in range(B):
                if b_hh != NULL:
                    memcpy(gh + b * GH, b_hh, GH * sizeof(floating))
                else:
                    memset(gh + b * GH, 0, GH * sizeof(floating))
            if B == 1:
                gemv(False, <int>GH, <int>H, one, w_hh, <int>H, h, one, gh)
            else:
                gemm(False, True, <int>B, <int>GH, <int>H, one, h, <int>H,
                     w_hh, <int>H, one, gh, <int>GH)
        elif B == 1:
            gemv(False, <int>GH, <int>H, one, w_hh, <int>H, h, one, g_t)
        else:
            gemm(False, True, <int>B, <int>GH, <int>H, one, h, <int>H,
                 w_hh, <int>H, one, g_t, <int>gx_stride_b)

        # fused gate pass, row by row
        for b in range(B):
            out_row = out_t + b * out_stride_b
            if lengths != NULL and t >= lengths[b]:
                memset(out_row, 0, H * sizeof(floating))
                continue
            if cell == _LSTM:
                lstm_row(g_t + b * gx_stride_b, h + b * H, c + b * H, out_row, H)
            elif cell == _GRU:
                gru_row(g_t + b * gx_stride_b, gh + b * GH, h + b * H, out_row, H)
            elif cell == _RNN_TANH:
                rnn_tanh_row(g_t + b * gx_stride_b, h + b * H, out_row, H)
            else:
                rnn_relu_row(g_t + b * gx_stride_b, h + b * H, out_row, H)


def forward_layer(*, int cell, Py_ssize_t T, Py_ssize_t B, bint batch_first,
                  const floating[:, ::1] x,
                  const floating[:, ::1] w_ih,
                  const floating[:, ::1] w_hh,
                  const floating[::1] bias_x,
                  const floating[::1] bias_h,
                  floating[:, :, ::1] h,
                  floating[:, :, ::1] c,
                  floating[:, ::1] gx,
                  floating[::1] gh,
                  floating[::1] out,
                  Py_ssize_t out_stride_t,
                  Py_ssize_t out_stride_b,
                  const int64_t[::1] lengths,
                  Py_ssize_t max_rows):
    """Run one layer (all its directions) forward over a whole sequence.

    Shapes (dirs directions, G gates, N = dirs * G * H; all checked by the
    caller): x (T * B, D) rows in time-major or batch-first order; w_ih
    (N, D); w_hh (N, H); bias_x (N,) added to the input projection or None;
    bias_h (N,) GRU recurrent bias or None (other cells fold it into bias_x);
    h, c (dirs, B, H) initial state in, final state out (c None unless LSTM);
    gx (T * B, N) workspace; gh (B * G * H,) GRU workspace or None; out, a
    flat buffer where step t, batch b, direction d starts at
    t * out_stride_t + b * out_stride_b + d * H; lengths (B,) or None;
    max_rows caps the rows of one input-projection GEMM (BLAS int range).
    """
    cdef Py_ssize_t dirs = h.shape[0]
    cdef Py_ssize_t H = h.shape[2]
    cdef Py_ssize_t GH = _num_gates(cell) * H
    cdef Py_ssize_t N = dirs * GH
    cdef Py_ssize_t D = x.shape[1]
    cdef Py_ssize_t gx_stride_t = N if batch_first else B * N
    cdef Py_ssize_t gx_stride_b = T * N if batch_first else N
    cdef Py_ssize_t d
    cdef const floating* bias_x_ptr = NULL if bias_x is None else &bias_x[0]
    cdef const floating* bias_h_ptr = NULL if bias_h is None else &bias_h[0]
    cdef floating* c_ptr = NULL if c is None else &c[0, 0, 0]
    cdef floating* gh_ptr = NULL if gh is None else &gh[0]
    cdef const int64_t* len_ptr = NULL if lengths is None else &lengths[0]
    if T == 0 or B == 0:
        return
    with nogil:
        _project_inputs(&x[0, 0], T * B, D, &w_ih[0, 0], N, bias_x_ptr,
                        &gx[0, 0], max_rows)
        for d in range(dirs):
            _run_direction(cell, d == 1, T, B, H,
                           &gx[0, 0] + d * GH, gx_stride_t, gx_stride_b,
                           &w_hh[d * GH, 0],
                           NULL if bias_h_ptr == NULL else bias_h_ptr + d * GH,
                           &h[d, 0, 0],
                           NULL if c_ptr == NULL else c_ptr + d * B * H,
                           gh_ptr,
                           &out[0] + d * H, out_stride_t, out_stride_b,
                           len_ptr)
