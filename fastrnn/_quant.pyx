# Kernels of int8 quantized inference (fastrnn.quantized): the input
# projection of every step and the time loops of a layer, with the products
# in int8 (_qkernel.h) and the state and gate arithmetic in float32 (the
# gate functions of _gates.pxd).
#
# A weight matrix W (N, K) is quantized once (fastrnn.quantized: int8 in
# [-127, 127], a float32 scale per row or per tensor) and packed here
# (QWeight). Activations are quantized per row at every use: each input row
# x_r for the projection, each batch row of h before each step's recurrent
# product (the reset-before GRU's r * h too). A row's product is
#
#   y[n] = float(sum_k q_x[k] * q_w[n][k]) * (s_x * s_w[n])   (+ bias[n])
#
# exact in int32 and the same in every build; the float32 operations are
# written in this order, and the module is compiled without contraction
# (setup.py: -ffp-contract=off), so every build gives the same bits.
#
# Layout as in _forward.pyx: R = T * B rows in the input's order (time-major
# row t * B + b, or batch-first b * T + t), direction d owning a column
# block of gx (R, dirs * G * H) and out (R, dirs * H).

from libc.stdint cimport int8_t, int32_t, int64_t
from libc.string cimport memset

import numpy as np

from fastrnn._worker cimport Interrupt, MAX_PARTS, interrupted, run_parts
from fastrnn._gates cimport (RNN_RELU, GRU, LSTM, GRU_RESET_BEFORE, num_gates, rnn_row,
                             gru_row, gru_reset_gates_row, gru_reset_row, lstm_row, sigmoid,
                             tanh_, fastrnn_flush_denormals, fastrnn_restore_fpenv)

cdef extern from "_qkernel.h":
    const char* FASTRNN_Q_ISA
    const int FASTRNN_Q_OFFSET
    const int FASTRNN_Q_MAX_K
    Py_ssize_t fastrnn_q_quads(Py_ssize_t K) noexcept nogil
    Py_ssize_t fastrnn_q_blocks(Py_ssize_t N) noexcept nogil
    Py_ssize_t fastrnn_q_packed_size(Py_ssize_t K, Py_ssize_t N) noexcept nogil
    void fastrnn_q_pack(const int8_t* w, Py_ssize_t ldw, Py_ssize_t K, Py_ssize_t N,
                        int8_t* out, int32_t* comp) noexcept nogil
    float fastrnn_q_row(const float* x, Py_ssize_t K, int8_t* q) noexcept nogil
    void fastrnn_q_gemm(Py_ssize_t M, Py_ssize_t K, const int8_t* a, Py_ssize_t lda,
                        const int8_t* packed, const int32_t* comp, Py_ssize_t N, int32_t* c,
                        Py_ssize_t ldc) noexcept nogil

# the instruction set of this build's products, and the largest K they take
ISA = FASTRNN_Q_ISA.decode()
MAX_K = FASTRNN_Q_MAX_K

# rows of the input projection quantized and multiplied at a time (the
# int8 rows and int32 sums of a block stay in the core's caches)
cdef enum:
    PROJECT_BLOCK = 64


cdef struct QView:
    const int8_t* panels
    const int32_t* comp
    const float* scale
    Py_ssize_t K, N


cdef class QWeight:
    """An int8 weight matrix (N, K) and its float32 scale per row, packed
    for the kernels (``_qkernel.h``). Immutable: computed once, read by any
    number of calls at once."""
    cdef readonly object packed, comp, scale
    cdef readonly Py_ssize_t K, N
    cdef QView view

    def __init__(self, const int8_t[:, ::1] w not None, const float[::1] scale not None):
        cdef Py_ssize_t N = w.shape[0], K = w.shape[1]
        cdef Py_ssize_t size = fastrnn_q_packed_size(K, N)
        cdef int8_t[::1] packed
        cdef int32_t[::1] comp
        if scale.shape[0] != N:
            raise ValueError(f"QWeight: expected {N} scales, got {scale.shape[0]}")
        if N < 1 or K < 1 or K > FASTRNN_Q_MAX_K:
            raise ValueError(f"QWeight: expected 1 to {FASTRNN_Q_MAX_K} columns and at "
                             f"least one row, got ({N}, {K})")
        buffer = np.empty(size + 64, np.int8)
        start = (-buffer.ctypes.data) % 64      # panels on cache lines
        self.packed = buffer[start:start + size]
        self.comp = np.empty(fastrnn_q_blocks(N) * 16, np.int32)
        self.scale = np.array(scale, np.float32)
        self.scale.flags.writeable = False
        packed, comp = self.packed, self.comp
        with nogil:
            fastrnn_q_pack(&w[0, 0], K, K, N, &packed[0], &comp[0])
        self.packed.flags.writeable = False
        self.comp.flags.writeable = False
        self.K, self.N = K, N
        cdef const float[::1] scales = self.scale
        self.view.panels = &packed[0]
        self.view.comp = &comp[0]
        self.view.scale = &scales[0]
        self.view.K, self.view.N = K, N

    def __reduce__(self):
        raise TypeError("QWeight is rebuilt from its quantized layer's arrays, not pickled")


cdef inline void _dequant(const int32_t* acc, float s, const float* scale, const float* bias,
                          float* y, Py_ssize_t N) noexcept nogil:
    """y = float(acc) * (s * scale) (+ bias)."""
    cdef Py_ssize_t n
    if bias != NULL:
        for n in range(N):
            y[n] = <float>acc[n] * (s * scale[n]) + bias[n]
    else:
        for n in range(N):
            y[n] = <float>acc[n] * (s * scale[n])


cdef inline void _dequant_add(const int32_t* acc, float s, const float* scale, float* y,
                              Py_ssize_t N) noexcept nogil:
    """y += float(acc) * (s * scale)."""
    cdef Py_ssize_t n
    for n in range(N):
        y[n] = y[n] + <float>acc[n] * (s * scale[n])


# --- the input projection ---

cdef struct ProjectJob:
    const float* x
    const float* bias
    float* gx
    Py_ssize_t D, N, qrow, ldacc
    QView w
    int8_t* qbuf                 # per part: PROJECT_BLOCK rows of qrow bytes
    float* sbuf                  # per part: PROJECT_BLOCK scales
    int32_t* acc                 # per part: PROJECT_BLOCK rows of ldacc sums
    Py_ssize_t rows[MAX_PARTS][2]
    Interrupt interrupt


cdef void _project_job(void* arg, int part) noexcept nogil:
    cdef ProjectJob* j = <ProjectJob*>arg
    cdef Py_ssize_t r0 = j.rows[part][0], r1 = j.rows[part][1]
    cdef int8_t* q = j.qbuf + part * PROJECT_BLOCK * j.qrow
    cdef float* s = j.sbuf + part * PROJECT_BLOCK
    cdef int32_t* acc = j.acc + part * PROJECT_BLOCK * j.ldacc
    cdef Py_ssize_t start, n, i
    cdef unsigned int fpenv
    if r1 <= r0:
        return
    fpenv = fastrnn_flush_denormals()
    start = r0
    while start < r1:
        if interrupted(&j.interrupt, True):
            break
        n = min(<Py_ssize_t>PROJECT_BLOCK, r1 - start)
        for i in range(n):
            s[i] = fastrnn_q_row(j.x + (start + i) * j.D, j.D, q + i * j.qrow)
        fastrnn_q_gemm(n, j.D, q, j.qrow, j.w.panels, j.w.comp, j.N, acc, j.ldacc)
        for i in range(n):
            _dequant(acc + i * j.ldacc, s[i], j.w.scale, j.bias, j.gx + (start + i) * j.N, j.N)
        start += n
    fastrnn_restore_fpenv(fpenv)


def project(*, const float[:, ::1] x not None, QWeight w_ih not None,
            const float[::1] bias_x, float[:, ::1] gx not None, parts):
    """gx (R, N) = the int8 product of x (R, D) quantized per row and
    w_ih (N, D), dequantized, + bias_x (N,) (None: no bias). ``parts``:
    row ranges (r0, r1), one per thread."""
    cdef ProjectJob job
    cdef Py_ssize_t nparts = len(parts)
    cdef int8_t[::1] qbuf
    cdef float[::1] sbuf
    cdef int32_t[::1] acc
    if x.shape[0] == 0:
        return
    if x.shape[1] != w_ih.K or gx.shape[1] != w_ih.N or gx.shape[0] != x.shape[0] or (
            bias_x is not None and bias_x.shape[0] != w_ih.N):
        raise ValueError("project: the arrays do not fit the weights")
    job.x = &x[0, 0]
    job.bias = NULL if bias_x is None else &bias_x[0]
    job.gx = &gx[0, 0]
    job.D = x.shape[1]
    job.N = w_ih.N
    job.qrow = fastrnn_q_quads(job.D) * 4
    job.ldacc = fastrnn_q_blocks(job.N) * 16
    job.w = w_ih.view
    qbuf = np.empty(nparts * PROJECT_BLOCK * job.qrow, np.int8)
    sbuf = np.empty(nparts * PROJECT_BLOCK, np.float32)
    acc = np.empty(nparts * PROJECT_BLOCK * job.ldacc, np.int32)
    job.qbuf, job.sbuf, job.acc = &qbuf[0], &sbuf[0], &acc[0]
    run_parts(_project_job, &job, &job.rows[0][0], 2, parts, &job.interrupt)


# --- the time loops ---

cdef struct RecurJob:
    int cell
    Py_ssize_t T, B, H, dirs, row_t, row_b, qrow, ldacc
    float* gx
    const float* bias_h          # GRU: the recurrent bias (dirs * G * H), or NULL
    float* h
    float* c
    float* out
    const int64_t* lengths
    QView w[2]                   # per direction W_hh (reset-before GRU: its r, z rows)
    QView wn[2]                  # reset-before GRU: W_hn per direction
    int8_t* qbuf                 # scratch rows, one per (direction, batch row)
    float* sbuf
    int32_t* acc
    float* gh
    float* acts
    Py_ssize_t ranges[MAX_PARTS][4]   # per part: d_lo, d_hi, b_lo, b_hi
    Interrupt interrupt


cdef void _run_direction(RecurJob* j, Py_ssize_t d, Py_ssize_t b_lo,
                         Py_ssize_t b_hi) noexcept nogil:
    """Direction d over every step for batch rows [b_lo, b_hi)."""
    cdef int cell = j.cell
    cdef Py_ssize_t H = j.H, B = b_hi - b_lo
    cdef Py_ssize_t GH = num_gates(cell) * H
    cdef Py_ssize_t gx_cols = j.dirs * GH, h_cols = j.dirs * H
    cdef Py_ssize_t row_t = j.row_t, row_b = j.row_b, qrow = j.qrow, ldacc = j.ldacc
    cdef Py_ssize_t base = d * j.B + b_lo          # this part's first scratch row
    cdef Py_ssize_t first = b_lo * row_b
    cdef int8_t* q = j.qbuf + base * qrow
    cdef float* s = j.sbuf + base
    cdef int32_t* acc = j.acc + base * ldacc
    cdef float* gh = NULL if j.gh == NULL else j.gh + base * GH
    cdef float* acts = j.acts + base * 4 * H
    cdef float* h = j.h + base * H
    cdef float* c = NULL if j.c == NULL else j.c + base * H
    cdef float* gx = j.gx + first * gx_cols + d * GH
    cdef float* out = j.out + first * h_cols + d * H
    cdef const float* bias_h = NULL if j.bias_h == NULL else j.bias_h + d * GH
    cdef const int64_t* lengths = NULL if j.lengths == NULL else j.lengths + b_lo
    cdef const QView* w = &j.w[d]
    cdef const QView* wn = &j.wn[d]
    cdef Py_ssize_t st, t, b, row
    cdef float* g_row
    cdef float* out_row
    for st in range(j.T):
        if interrupted(&j.interrupt):
            return
        t = j.T - 1 - st if d == 1 else st
        # the recurrent product of h quantized per row
        for b in range(B):
            s[b] = fastrnn_q_row(h + b * H, H, q + b * qrow)
        fastrnn_q_gemm(B, H, q, qrow, w.panels, w.comp, w.N, acc, ldacc)
        if cell == GRU:
            for b in range(B):
                _dequant(acc + b * ldacc, s[b], w.scale, bias_h, gh + b * GH, GH)
        else:
            for b in range(B):
                row = t * row_t + b * row_b
                _dequant_add(acc + b * ldacc, s[b], w.scale, gx + row * gx_cols, w.N)
            if cell == GRU_RESET_BEFORE:
                # r, z, then the n product of r * h quantized per row
                for b in range(B):
                    row = t * row_t + b * row_b
                    gru_reset_gates_row(gx + row * gx_cols, h + b * H, acts + b * 4 * H, H)
                    s[b] = fastrnn_q_row(acts + b * 4 * H + 3 * H, H, q + b * qrow)
                fastrnn_q_gemm(B, H, q, qrow, wn.panels, wn.comp, wn.N, acc, ldacc)
                for b in range(B):
                    row = t * row_t + b * row_b
                    _dequant_add(acc + b * ldacc, s[b], wn.scale, gx + row * gx_cols + 2 * H, H)
        # the gate pass, row by row
        for b in range(B):
            row = t * row_t + b * row_b
            out_row = out + row * h_cols
            if lengths != NULL and t >= lengths[b]:
                memset(out_row, 0, H * sizeof(float))
                continue
            g_row = gx + row * gx_cols
            if cell == LSTM:
                lstm_row(g_row, h + b * H, c + b * H, out_row, acts + b * 4 * H, H, H)
            elif cell == GRU:
                gru_row(g_row, gh + b * GH, h + b * H, h + b * H, out_row, acts + b * 4 * H,
                        H, H)
            elif cell == GRU_RESET_BEFORE:
                gru_reset_row(g_row, h + b * H, out_row, acts + b * 4 * H, H)
            else:
                rnn_row(g_row, h + b * H, out_row, acts + b * 4 * H, H, cell == RNN_RELU)


cdef void _recur_job(void* arg, int part) noexcept nogil:
    cdef RecurJob* j = <RecurJob*>arg
    cdef Py_ssize_t d_lo = j.ranges[part][0], d_hi = j.ranges[part][1]
    cdef Py_ssize_t b_lo = j.ranges[part][2], b_hi = j.ranges[part][3]
    cdef Py_ssize_t d
    cdef unsigned int fpenv
    if d_hi <= d_lo or b_hi <= b_lo:
        return
    fpenv = fastrnn_flush_denormals()   # per thread: the worker sets its own
    for d in range(d_lo, d_hi):
        _run_direction(j, d, b_lo, b_hi)
    fastrnn_restore_fpenv(fpenv)


def recur(*, int cell, Py_ssize_t T, bint batch_first, parts, weights, weights_n,
          const float[::1] bias_h, float[:, :, ::1] h not None, float[:, :, ::1] c,
          float[:, ::1] gx not None, float[:, ::1] out not None,
          const int64_t[::1] lengths):
    """The time loops of one layer after ``project``: ``parts`` a list of
    (d_lo, d_hi, b_lo, b_hi), one per thread, on disjoint memory.

    weights: per direction the QWeight of W_hh (the reset-before GRU: of its
    r, z rows, and weights_n of its n rows; else None); bias_h the GRU's
    recurrent bias (dirs * 3 * H,) or None (other cells fold it into gx);
    h, c (dirs, B, H) the initial state in, the final state out (c: LSTM
    only); gx (R, dirs * G * H) from ``project``, used as scratch; out
    (R, dirs * H); lengths (B,) or None. Shapes are the caller's to check.
    """
    cdef RecurJob job
    cdef Py_ssize_t d, H = h.shape[2], G = num_gates(cell)
    cdef QWeight qw
    cdef int8_t[::1] qbuf
    cdef float[::1] sbuf, ghbuf, actsbuf
    cdef int32_t[::1] acc
    if T == 0 or h.shape[1] == 0:
        return
    job.cell = cell
    job.T = T
    job.B = h.shape[1]
    job.H = H
    job.dirs = h.shape[0]
    if len(weights) != job.dirs or (cell == GRU_RESET_BEFORE) != (weights_n is not None):
        raise ValueError("recur: the weights do not fit the layer")
    for d in range(job.dirs):
        qw = weights[d]
        if qw.K != H or qw.N != (2 if cell == GRU_RESET_BEFORE else G) * H:
            raise ValueError("recur: the weights do not fit the layer")
        job.w[d] = qw.view
        if weights_n is not None:
            qw = weights_n[d]
            if qw.K != H or qw.N != H:
                raise ValueError("recur: the weights do not fit the layer")
            job.wn[d] = qw.view
    job.row_t = 1 if batch_first else job.B
    job.row_b = T if batch_first else 1
    job.qrow = fastrnn_q_quads(H) * 4
    job.ldacc = fastrnn_q_blocks(G * H) * 16
    job.gx = &gx[0, 0]
    job.bias_h = NULL if bias_h is None else &bias_h[0]
    job.h = &h[0, 0, 0]
    job.c = NULL if c is None else &c[0, 0, 0]
    job.out = &out[0, 0]
    job.lengths = NULL if lengths is None else &lengths[0]
    rows = job.dirs * job.B
    qbuf = np.empty(rows * job.qrow, np.int8)
    sbuf = np.empty(rows, np.float32)
    acc = np.empty(rows * job.ldacc, np.int32)
    actsbuf = np.empty(rows * 4 * H, np.float32)
    job.qbuf, job.sbuf, job.acc, job.acts = &qbuf[0], &sbuf[0], &acc[0], &actsbuf[0]
    job.gh = NULL
    if cell == GRU:
        ghbuf = np.empty(rows * G * H, np.float32)
        job.gh = &ghbuf[0]
    run_parts(_recur_job, &job, &job.ranges[0][0], 4, parts, &job.interrupt)


# --- for the tests: the pieces, exposed ---

def quantize_rows(const float[:, ::1] x not None):
    """(q, scales): each row of x quantized as the kernels quantize
    activations; q int8 (M, K) in [-127, 127], scales float32 (M,)."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], i, k
    cdef Py_ssize_t qrow = fastrnn_q_quads(K) * 4
    cdef int8_t[:, ::1] buf = np.empty((M, qrow), np.int8)
    cdef float[::1] s = np.empty(M, np.float32)
    with nogil:
        for i in range(M):
            s[i] = fastrnn_q_row(&x[i, 0], K, &buf[i, 0])
    q = np.asarray(buf)[:, :K].view(np.uint8).astype(np.int16) if FASTRNN_Q_OFFSET else \
        np.asarray(buf)[:, :K].astype(np.int16)
    return (q - FASTRNN_Q_OFFSET).astype(np.int8), np.asarray(s)


def int_product(const int8_t[:, ::1] q not None, QWeight w not None):
    """The int32 sums q (M, K) . W^T (M, N) as the kernels compute them
    (q in [-127, 127])."""
    cdef Py_ssize_t M = q.shape[0], K = q.shape[1], i, k
    cdef Py_ssize_t qrow = fastrnn_q_quads(K) * 4, ldc = fastrnn_q_blocks(w.N) * 16
    cdef int8_t[:, ::1] a = np.full((M, qrow), <int8_t>(<unsigned char>FASTRNN_Q_OFFSET),
                                     np.int8)
    cdef int32_t[:, ::1] c = np.empty((M, ldc), np.int32)
    if K != w.K:
        raise ValueError(f"int_product: expected q with {w.K} columns, got {K}")
    if M == 0:
        return np.zeros((0, w.N), np.int32)
    with nogil:
        for i in range(M):
            for k in range(K):
                a[i, k] = <int8_t>(<unsigned char>(q[i, k] + FASTRNN_Q_OFFSET))
        fastrnn_q_gemm(M, K, &a[0, 0], qrow, w.view.panels, w.view.comp, w.N, &c[0, 0], ldc)
    return np.asarray(c)[:, :w.N].copy()


def activations(*, const float[::1] x not None, float[::1] sigmoid_out not None,
                float[::1] tanh_out not None):
    """The float32 sigmoid and tanh exactly as this module's gate pass
    computes them (its build's flags), elementwise over x."""
    cdef Py_ssize_t j
    with nogil:
        for j in range(x.shape[0]):
            sigmoid_out[j] = sigmoid(x[j])
            tanh_out[j] = tanh_(x[j])
