# Kernels of reduced-precision inference (fastrnn.quantized): the input
# projection and the time loops of a stack of layers, with the products in
# int8 or bfloat16 (_qkernel.h) and the state and gate arithmetic in float32
# (the gate functions of _gates.pxd.tp).
#
# A weight matrix W (N, K) is quantized once (fastrnn.quantized: int8 in
# [-127, 127] with a float32 scale per row or per tensor, or bfloat16) and
# packed here (QWeight). Activations are converted per row at every use:
# each input row x_r for the projection, each batch row of h before each
# step's recurrent product (the reset-before GRU's r * h too). An int8 row's
# product is
#
#   y[n] = add[n] + float(sum_k q_x[k] * q_w[n][k]) * (s_x * s_w[n])
#
# (add: the bias, or the step's input projection), the sum exact in int32,
# dequantized in the product's tile; a bfloat16 one y[n] = add[n] + (a
# float32 chain over the pairs of k, _qkernel.h; on AMX tiles the tiles'
# own order). The float32 operations
# are written in one order and the module is compiled without contraction
# (setup.py: -ffp-contract=off), the activations' polynomials fused by hand
# where the CPU has FMA (_activations.h): every build with FMA gives the
# same bits, the others the same integer sums (FUSED tells which).
#
# Layout: the input and the last layer's output are R = T * B rows in the
# input's order (time-major row t * B + b, or batch-first b * T + t); the
# input projections (gx) and the layers between are batch-major rows of a
# time window (forward). Direction d owns a column block of each.
#
# Threads: ``forward`` gives each part (thread) its directions and batch
# rows, whole time loops with no per-step synchronisation;
# ``forward_units`` splits one batch row's hidden units between two
# threads that meet after every step.

cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int8_t, int32_t, int64_t, uint16_t
from libc.math cimport NAN
from libc.string cimport memcpy, memset

import numpy as np

cnp.import_array()

from fastrnn._ndarrays cimport initial_states, plain_input
from fastrnn._worker cimport (Interrupt, MAX_PARTS, TEAM_SYNC, interrupt_start, interrupted,
                              raise_if_interrupted, run_parts, run_team, team_barrier,
                              team_slots, unit_bounds_fit)
from fastrnn._gates cimport (RNN_RELU, GRU, LSTM, GRU_RESET_BEFORE, num_gates, rnn_row,
                             gru_row, gru_reset_gates_row, gru_reset_row, lstm_row, sigmoid_lim,
                             tanh_lim, read_exp_max, fastrnn_flush_denormals, fastrnn_restore_fpenv,
                             FUSED_ACTIVATIONS)

cdef extern from "_qkernel.h":
    const char* FASTRNN_Q_ISA
    const int FASTRNN_Q_OFFSET
    const int FASTRNN_Q_MAX_K
    Py_ssize_t fastrnn_q_quads(Py_ssize_t K) noexcept nogil
    Py_ssize_t fastrnn_q_blocks(Py_ssize_t N) noexcept nogil
    Py_ssize_t fastrnn_q_packed_size(Py_ssize_t K, Py_ssize_t N) noexcept nogil
    void fastrnn_q_pack(const int8_t* w, Py_ssize_t ldw, Py_ssize_t K, Py_ssize_t N,
                        int8_t* out, int32_t* comp) noexcept nogil
    void fastrnn_q_unpack(const int8_t* packed, Py_ssize_t K, Py_ssize_t N, int8_t* w,
                          Py_ssize_t ldw) noexcept nogil
    float fastrnn_q_row(const float* x, Py_ssize_t K, int8_t* q,
                        const float* next) noexcept nogil
    void fastrnn_q_gemm(Py_ssize_t M, Py_ssize_t K, const int8_t* a, Py_ssize_t lda,
                        const int8_t* packed, const int32_t* comp, Py_ssize_t N, int32_t* c,
                        Py_ssize_t ldc) noexcept nogil
    int fastrnn_q_amx_enable() noexcept nogil
    int fastrnn_b_amx_enable() noexcept nogil
    void fastrnn_amx_release() noexcept nogil
    const char* FASTRNN_B_ISA
    Py_ssize_t fastrnn_b_pairs(Py_ssize_t K) noexcept nogil
    void fastrnn_b_pack(const uint16_t* w, Py_ssize_t ldw, Py_ssize_t K, Py_ssize_t N,
                        uint16_t* out) noexcept nogil
    void fastrnn_b_unpack(const uint16_t* packed, Py_ssize_t K, Py_ssize_t N, uint16_t* w,
                          Py_ssize_t ldw) noexcept nogil
    float fastrnn_b_row(const float* x, Py_ssize_t K, int8_t* q,
                        const float* next) noexcept nogil
    void fastrnn_b_gemm(Py_ssize_t M, Py_ssize_t K, const int8_t* a, Py_ssize_t lda,
                        const int8_t* packed, Py_ssize_t N, const float* add,
                        Py_ssize_t ld_add, float* y, Py_ssize_t ldy) noexcept nogil
    void fastrnn_q_gemm_dequant(Py_ssize_t M, Py_ssize_t K, const int8_t* a, Py_ssize_t lda,
                                const int8_t* packed, const int32_t* comp, Py_ssize_t N,
                                const float* rs, const float* cs, const float* add,
                                Py_ssize_t ld_add, float* y, Py_ssize_t ldy) noexcept nogil
    const int FASTRNN_Q_PEAK_MACS
    void fastrnn_q_peak_loop(long long iters, int32_t* sink) noexcept nogil

# the instruction set of this build's products (int8, bfloat16), and the
# largest K they take
ISA = FASTRNN_Q_ISA.decode()
BF16_ISA = FASTRNN_B_ISA.decode()
# whether the int8 products run on AMX tiles (this build has them, the CPU
# too, and Linux granted this process their state; asked once, here)
AMX = bool(fastrnn_q_amx_enable())
# whether the bfloat16 products run on AMX tiles (then their bits differ from
# the other builds', within float32 rounding: _qkernel.h)
AMX_BF16 = bool(fastrnn_b_amx_enable())
# whether the activations' multiply-adds are fused (FMA builds): the builds
# that agree on it give the same bits
FUSED = bool(FUSED_ACTIVATIONS)
# the weight kinds of a QWeight
KIND_INT8 = 0
KIND_BF16 = 1
MAX_K = FASTRNN_Q_MAX_K

# rows of the input projection quantized and multiplied at a time (the
# int8 rows and int32 sums of a block stay in the core's caches)
cdef enum:
    PROJECT_BLOCK = 64
# the most batch rows forward_units takes (a step's rows convert at once)
UNIT_MAX_ROWS = PROJECT_BLOCK


def unit_weights(QStack stack not None, bounds):
    """forward_units' ``part_weights`` for a split at ``bounds``: per layer,
    per part, (W_ih's, W_hh's) QWeights of each gate's rows of the part's
    units, the same values and scales (read back from the panels)."""
    cdef Py_ssize_t H = stack.hidden_size, G = num_gates(stack.cell)
    if not unit_bounds_fit(bounds, H, 1):
        raise ValueError(f"unit_weights: expected bounds rising from 0 to {H}, got "
                         f"{list(bounds)}")
    out = []
    for w_ih, w_hh, _, _, _ in stack.keep:
        matrices = [(w, w.weights()) for w in (w_ih, w_hh[0])]   # (each read back once)
        per_part = []
        for p in range(len(bounds) - 1):
            lo, hi = bounds[p], bounds[p + 1]
            pair = []
            for w, values in matrices:
                pair.append([QWeight(np.ascontiguousarray(values[g * H + lo:g * H + hi]),
                                     np.ascontiguousarray(w.scale[g * H + lo:g * H + hi]),
                                     w.kind) for g in range(G)])
            per_part.append(pair)
        out.append(per_part)
    return out


def units_fit(int gates, Py_ssize_t H, bounds, Py_ssize_t B):
    """Whether forward_units takes the split of H units of a ``gates``-gate
    stack at ``bounds`` (0 = b_0 < b_1 < ... < b_n = H, 2 to MAX_PARTS
    parts) at B batch rows (its docstring says why): H a multiple of 16, the
    inner bounds of 64, (gates - 1) * H + b_(n-1) of 64, 1 <= B <=
    UNIT_MAX_ROWS. The plan asks it before choosing the split."""
    return (H % 16 == 0 and 1 <= B <= PROJECT_BLOCK and unit_bounds_fit(bounds, H, 64)
            and ((gates - 1) * H + bounds[len(bounds) - 2]) % 64 == 0)


cdef struct QView:
    int kind                     # KIND_INT8 or KIND_BF16
    const int8_t* panels
    const int32_t* comp
    const float* scale
    Py_ssize_t K, N


cdef class QWeight:
    """A weight matrix (N, K) packed for the kernels (``_qkernel.h``): int8
    (kind 0) with its float32 scale per row, or bfloat16 bit patterns (kind
    1; scales unused). Immutable: computed once, read by any number of
    calls at once."""
    cdef readonly object packed, comp, scale
    cdef readonly Py_ssize_t K, N
    cdef readonly int kind
    cdef QView view

    def __init__(self, w not None, const float[::1] scale not None, int kind=0):
        cdef const int8_t[:, ::1] w8
        cdef const uint16_t[:, ::1] w16
        cdef Py_ssize_t N, K, size
        cdef int8_t[::1] packed
        cdef int32_t[::1] comp
        if kind == 0:
            w8 = w
            N, K = w8.shape[0], w8.shape[1]
            size = fastrnn_q_packed_size(K, N)
        elif kind == 1:
            w16 = w
            N, K = w16.shape[0], w16.shape[1]
            size = fastrnn_q_blocks(N) * fastrnn_b_pairs(K) * 64
        else:
            raise ValueError(f"QWeight: kind must be 0 (int8) or 1 (bfloat16), got {kind}")
        if scale.shape[0] != N:
            raise ValueError(f"QWeight: expected {N} scales, got {scale.shape[0]}")
        if N < 1 or K < 1 or K > FASTRNN_Q_MAX_K:
            raise ValueError(f"QWeight: expected 1 to {FASTRNN_Q_MAX_K} columns and at "
                             f"least one row, got ({N}, {K})")
        buffer = np.empty(size + 64, np.int8)
        start = (-buffer.ctypes.data) % 64      # panels on cache lines
        self.packed = buffer[start:start + size]
        self.comp = np.zeros(fastrnn_q_blocks(N) * 16, np.int32)
        padded = np.zeros(fastrnn_q_blocks(N) * 16, np.float32)   # read by whole blocks
        padded[:N] = scale
        padded.flags.writeable = False
        self.scale = padded[:N]
        packed, comp = self.packed, self.comp
        with nogil:
            if kind == 0:
                fastrnn_q_pack(&w8[0, 0], K, K, N, &packed[0], &comp[0])
            else:
                fastrnn_b_pack(&w16[0, 0], K, K, N, <uint16_t*>&packed[0])
        self.packed.flags.writeable = False
        self.comp.flags.writeable = False
        self.K, self.N, self.kind = K, N, kind
        cdef const float[::1] scales = padded
        self.view.kind = kind
        self.view.panels = &packed[0]
        self.view.comp = &comp[0]
        self.view.scale = &scales[0]
        self.view.K, self.view.N = K, N

    def weights(self):
        """The matrix (N, K) the panels hold, in a new array: int8, or
        bfloat16 bit patterns (uint16). The panels are the only copy a
        quantized layer keeps; its state_dict reads the weights back here."""
        cdef const int8_t[::1] packed = self.packed
        cdef int8_t[:, ::1] w8
        cdef uint16_t[:, ::1] w16
        if self.kind == 0:
            out = np.empty((self.N, self.K), np.int8)
            w8 = out
            with nogil:
                fastrnn_q_unpack(&packed[0], self.K, self.N, &w8[0, 0], self.K)
        else:
            out = np.empty((self.N, self.K), np.uint16)
            w16 = out
            with nogil:
                fastrnn_b_unpack(<const uint16_t*>&packed[0], self.K, self.N, &w16[0, 0],
                                 self.K)
        return out

    def __reduce__(self):
        raise TypeError("QWeight is rebuilt from its quantized layer's arrays, not pickled")


cdef inline Py_ssize_t _row_bytes(int kind, Py_ssize_t K) noexcept nogil:
    """Bytes of one activation row of K values: quads of int8 or pairs of bf16."""
    return (fastrnn_b_pairs(K) if kind else fastrnn_q_quads(K)) * 4


cdef inline float _row(int kind, const float* x, Py_ssize_t K, int8_t* q,
                       const float* next=NULL) noexcept nogil:
    """An activation row converted for the products: its scale (bf16: 1),
    -1 if x is not finite. next (or NULL): the row converted after it, to
    fetch meanwhile (_qkernel.h: fastrnn_q_row)."""
    return fastrnn_b_row(x, K, q, next) if kind else fastrnn_q_row(x, K, q, next)


cdef inline float _inner_row(int kind, const float* x, Py_ssize_t K, int8_t* q,
                             const float* next=NULL) noexcept nogil:
    """_row for a row the call computed (h at a step, a lower layer's output):
    one that overflowed to inf (or NaN) gets the scale NaN, so that its
    products are NaN, as float32's would be (inf - inf), instead of the
    zeros of its int8 row. Only what the caller gave (x, the initial state)
    is refused. (bfloat16 keeps inf and NaN in the row itself.)"""
    cdef float scale = _row(kind, x, K, q, next)
    return scale if scale >= 0 else NAN


cdef inline float _input_row(int kind, const float* x, Py_ssize_t K, int8_t* q, bint inner,
                             int* bad, const float* next=NULL) noexcept nogil:
    """A layer's input row converted: a lower layer's output (inner) as
    _inner_row does, the caller's x as _row does, a non-finite one setting
    *bad to 1."""
    cdef float scale
    if inner:
        return _inner_row(kind, x, K, q, next)
    scale = _row(kind, x, K, q, next)
    if scale < 0:
        bad[0] = 1
    return scale


cdef inline void _product(const QView* w, Py_ssize_t M, const int8_t* a, Py_ssize_t lda,
                          const float* rs, const float* add, Py_ssize_t ld_add, float* y,
                          Py_ssize_t ldy) noexcept nogil:
    """y = add + the product of M activation rows and W^T (int8: dequantized
    with the rows' scales rs and W's)."""
    if w.kind:
        fastrnn_b_gemm(M, w.K, a, lda, w.panels, w.N, add, ld_add, y, ldy)
    else:
        fastrnn_q_gemm_dequant(M, w.K, a, lda, w.panels, w.comp, w.N, rs, w.scale, add, ld_add,
                               y, ldy)


# --- the input projection ---

cdef struct ProjectJob:
    const float* x
    const float* bias
    float* gx
    Py_ssize_t D, N, qrow
    # steps > 0: row r of gx is x's row of batch row b0 + r // steps, step
    # t0 + r % steps, at (t * x_row_t + b * x_row_b) rows of x (steps = 0:
    # row r of x)
    Py_ssize_t t0, b0, steps, x_row_t, x_row_b
    QView w
    int8_t* qbuf                 # per part: PROJECT_BLOCK rows of qrow bytes, qstride apart
    Py_ssize_t qstride           # (the same for every layer: parts may be in different ones)
    float* sbuf                  # per part: PROJECT_BLOCK scales
    int bad                      # set when a row of x is not finite
    bint inner                   # x is a lower layer's output: _inner_row, never bad
    Py_ssize_t rows[MAX_PARTS][2]
    Interrupt* it                # the call's (this job's own, or a window job's)
    Interrupt interrupt


cdef inline const float* _project_row(const ProjectJob* j, Py_ssize_t r) noexcept nogil:
    """The row of x that row r of gx projects."""
    if j.steps == 0:
        return j.x + r * j.D
    return j.x + ((j.t0 + r % j.steps) * j.x_row_t + (j.b0 + r // j.steps) * j.x_row_b) * j.D


cdef void _project_job(void* arg, int part) noexcept nogil:
    cdef ProjectJob* j = <ProjectJob*>arg
    cdef Py_ssize_t r0 = j.rows[part][0], r1 = j.rows[part][1]
    cdef int8_t* q = j.qbuf + part * j.qstride
    cdef float* s = j.sbuf + part * PROJECT_BLOCK
    cdef const float* x_row
    cdef const float* x_next
    cdef Py_ssize_t start, n, i
    cdef unsigned int fpenv
    if r1 <= r0:
        return
    fpenv = fastrnn_flush_denormals()
    start = r0
    while start < r1:
        if interrupted(j.it, True):
            break
        n = min(<Py_ssize_t>PROJECT_BLOCK, r1 - start)
        x_row = _project_row(j, start)
        for i in range(n):
            # (the part's next row fetched meanwhile: the rows come from memory)
            x_next = _project_row(j, start + i + 1) if start + i + 1 < r1 else NULL
            s[i] = _input_row(j.w.kind, x_row, j.D, q + i * j.qrow, j.inner, &j.bad, x_next)
            x_row = x_next
        _product(&j.w, n, q, j.qrow, s, j.bias, 0, j.gx + start * j.N, j.N)
        start += n
    fastrnn_amx_release()
    fastrnn_restore_fpenv(fpenv)


cdef inline void _setup_project(ProjectJob* job, const float* x, Py_ssize_t D, QView w,
                                const float* bias, float* gx, char* scratch,
                                Py_ssize_t nparts, Py_ssize_t D_max) noexcept nogil:
    """The job of one projection of D inputs; scratch: _project_scratch(D_max,
    N, nparts) bytes, D_max the widest input of the call's layers."""
    job.x, job.D, job.w, job.bias, job.gx, job.N = x, D, w, bias, gx, w.N
    job.steps = job.b0 = 0
    job.inner = False
    job.it = &job.interrupt
    job.qrow = _row_bytes(w.kind, D)
    job.qstride = PROJECT_BLOCK * fastrnn_b_pairs(D_max) * 4
    job.bad = 0
    job.sbuf = <float*>scratch
    job.qbuf = <int8_t*>(job.sbuf + nparts * PROJECT_BLOCK)


cdef inline Py_ssize_t _project_scratch(Py_ssize_t D, Py_ssize_t N,
                                        Py_ssize_t nparts) noexcept nogil:
    return nparts * PROJECT_BLOCK * (4 + fastrnn_b_pairs(D) * 4)   # the longer of the rows


def project(*, const float[:, ::1] x not None, QWeight w_ih not None,
            const float[::1] bias_x, float[:, ::1] gx not None, parts, bint own_input=False):
    """gx (R, N) = the int8 product of x (R, D) quantized per row and
    w_ih (N, D), dequantized, + bias_x (N,) (None: no bias); ``parts``: row
    ranges (r0, r1), one per thread. Returns False if a row of x is not
    finite (gx is then not meaningful), unless ``own_input``: x is the
    model's own (a lower layer's output), whose non-finite rows propagate
    (_inner_row)."""
    cdef ProjectJob job
    cdef unsigned char[::1] scratch
    if x.shape[0] == 0:
        return True
    if x.shape[1] != w_ih.K or gx.shape[1] != w_ih.N or gx.shape[0] != x.shape[0] or (
            bias_x is not None and bias_x.shape[0] != w_ih.N):
        raise ValueError("project: the arrays do not fit the weights")
    scratch = np.empty(_project_scratch(w_ih.K, w_ih.N, len(parts)), np.uint8)
    _setup_project(&job, &x[0, 0], x.shape[1], w_ih.view,
                   NULL if bias_x is None else &bias_x[0], &gx[0, 0], <char*>&scratch[0],
                   len(parts), w_ih.K)
    job.inner = own_input
    run_parts(_project_job, &job, &job.rows[0][0], 2, parts, &job.interrupt)
    return not job.bad


# --- the time loops ---

cdef struct RecurJob:
    int cell
    # steps [t0, t0 + T) of the sequence; gx holds them from its row 0 and
    # out from step t0 (row (t - g_t0) * g_row_t + b * g_row_b of gx, and
    # (t - o_t0) * o_row_t + b * o_row_b of out)
    Py_ssize_t t0, T, B, H, dirs, qrow
    Py_ssize_t g_row_t, g_row_b, g_t0, o_row_t, o_row_b, o_t0
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
    float* gh
    float* acts
    int bad                      # set when h or c is not finite (the initial state)
    bint own_state               # the initial state is the model's own (carried): not checked
    Py_ssize_t ranges[MAX_PARTS][4]   # per part: d_lo, d_hi, b_lo, b_hi
    Interrupt* it                # the call's (this job's own, or a window job's)
    Interrupt interrupt


cdef void _run_direction(RecurJob* j, Py_ssize_t d, Py_ssize_t b_lo,
                         Py_ssize_t b_hi) noexcept nogil:
    """Direction d over every step for batch rows [b_lo, b_hi)."""
    cdef int cell = j.cell
    cdef Py_ssize_t H = j.H, B = b_hi - b_lo
    cdef Py_ssize_t GH = num_gates(cell) * H
    cdef Py_ssize_t gx_cols = j.dirs * GH, h_cols = j.dirs * H
    cdef Py_ssize_t row_t = j.g_row_t, row_b = j.g_row_b, qrow = j.qrow
    cdef Py_ssize_t o_row_t = j.o_row_t, o_row_b = j.o_row_b
    cdef Py_ssize_t base = d * j.B + b_lo          # this part's first scratch row
    cdef int8_t* q = j.qbuf + base * qrow
    cdef float* s = j.sbuf + base
    cdef float* gh = NULL if j.gh == NULL else j.gh + base * GH
    cdef float* acts = j.acts + base * 4 * H
    cdef float* h = j.h + base * H
    cdef float* c = NULL if j.c == NULL else j.c + base * H
    cdef float* gx = j.gx + b_lo * row_b * gx_cols + d * GH
    cdef float* out = j.out + b_lo * o_row_b * h_cols + d * H
    cdef const float* bias_h = NULL if j.bias_h == NULL else j.bias_h + d * GH
    cdef const int64_t* lengths = NULL if j.lengths == NULL else j.lengths + b_lo
    cdef const QView* w = &j.w[d]
    cdef const QView* wn = &j.wn[d]
    cdef Py_ssize_t st, t, b, row
    cdef float* g_row
    cdef float* g_t
    cdef float* out_row
    if j.t0 == 0 and not j.own_state:   # the caller's initial state (a later
                                        # window's is the call's own)
        for b in range(B):   # (c converted only to be checked)
            if _row(w.kind, h + b * H, H, q) < 0 or (
                    c != NULL and _row(w.kind, c + b * H, H, q) < 0):
                j.bad = 1
                return
    for st in range(j.T):
        if interrupted(j.it):
            return
        t = j.t0 + (j.T - 1 - st if d == 1 else st)
        # the recurrent product of h quantized per row
        for b in range(B):
            s[b] = _inner_row(w.kind, h + b * H, H, q + b * qrow)
        g_t = gx + (t - j.g_t0) * row_t * gx_cols
        if cell == GRU:
            _product(w, B, q, qrow, s, bias_h, 0, gh, GH)
        else:
            _product(w, B, q, qrow, s, g_t, row_b * gx_cols, g_t, row_b * gx_cols)
            if cell == GRU_RESET_BEFORE:
                # r, z, then the n product of r * h quantized per row
                for b in range(B):
                    row = (t - j.g_t0) * row_t + b * row_b
                    gru_reset_gates_row(gx + row * gx_cols, h + b * H, acts + b * 4 * H, H)
                    s[b] = _inner_row(w.kind, acts + b * 4 * H + 3 * H, H, q + b * qrow)
                _product(wn, B, q, qrow, s, g_t + 2 * H, row_b * gx_cols, g_t + 2 * H,
                         row_b * gx_cols)
        # the gate pass, row by row
        for b in range(B):
            out_row = out + ((t - j.o_t0) * o_row_t + b * o_row_b) * h_cols
            if lengths != NULL and t >= lengths[b]:
                memset(out_row, 0, H * sizeof(float))
                continue
            g_row = gx + ((t - j.g_t0) * row_t + b * row_b) * gx_cols
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
    fastrnn_amx_release()
    fastrnn_restore_fpenv(fpenv)


# --- a stack of layers ---

cdef struct QLayer:
    QView w_ih                   # every direction's W_ih stacked
    QView w_hh[2]
    QView w_hn[2]
    const float* bias_x
    const float* bias_h


cdef class QStack:
    """A quantized layer's weights as ``forward`` reads them: per layer
    (w_ih, [w_hh per direction], [w_hn per direction] or None, bias_x,
    bias_h), QWeights and float32 biases (None: none), kept alive here."""
    cdef QLayer* layers
    cdef readonly int cell, dirs, num_layers, kind
    cdef readonly Py_ssize_t input_size, hidden_size
    cdef object keep

    def __cinit__(self):
        self.layers = NULL

    def __init__(self, int cell, Py_ssize_t input_size, Py_ssize_t hidden_size, int dirs,
                 list layers not None):
        cdef Py_ssize_t k, d, G = num_gates(cell), H = hidden_size
        cdef QWeight qw
        cdef const float[::1] bias
        if dirs not in (1, 2) or not layers:
            raise ValueError("QStack: expected 1 or 2 directions and at least one layer")
        self.cell, self.dirs, self.num_layers = cell, dirs, len(layers)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.keep = layers
        self.layers = <QLayer*>PyMem_Malloc(len(layers) * sizeof(QLayer))
        if self.layers == NULL:
            raise MemoryError()
        self.kind = (<QWeight?>layers[0][0]).kind
        kinds = {w.kind for w_ih, w_hh, w_hn, _, _ in layers
                 for w in [w_ih] + list(w_hh) + list(w_hn or [])}
        if kinds != {self.kind}:
            raise ValueError("QStack: the layers mix int8 and bfloat16 weights")
        for k, (w_ih, w_hh, w_hn, bias_x, bias_h) in enumerate(layers):
            qw = w_ih
            if qw.N != dirs * G * H or qw.K != (input_size if k == 0 else dirs * H):
                raise ValueError(f"QStack: layer {k}'s W_ih does not fit")
            self.layers[k].w_ih = qw.view
            if len(w_hh) != dirs or (cell == GRU_RESET_BEFORE) != (w_hn is not None):
                raise ValueError(f"QStack: layer {k}'s W_hh does not fit")
            for d in range(dirs):
                qw = w_hh[d]
                if qw.K != H or qw.N != (2 if cell == GRU_RESET_BEFORE else G) * H:
                    raise ValueError(f"QStack: layer {k}'s W_hh does not fit")
                self.layers[k].w_hh[d] = qw.view
                if w_hn is not None:
                    qw = w_hn[d]
                    if qw.K != H or qw.N != H:
                        raise ValueError(f"QStack: layer {k}'s W_hn does not fit")
                    self.layers[k].w_hn[d] = qw.view
            self.layers[k].bias_x = NULL
            self.layers[k].bias_h = NULL
            if bias_x is not None:
                bias = bias_x
                if bias.shape[0] != dirs * G * H:
                    raise ValueError(f"QStack: layer {k}'s bias does not fit")
                self.layers[k].bias_x = &bias[0]
            if bias_h is not None:
                bias = bias_h
                if bias.shape[0] != dirs * G * H or cell != GRU:
                    raise ValueError(f"QStack: layer {k}'s recurrent bias does not fit")
                self.layers[k].bias_h = &bias[0]

    def __dealloc__(self):
        PyMem_Free(self.layers)

    def __reduce__(self):
        raise TypeError("QStack is rebuilt from its quantized layer's arrays, not pickled")


cdef inline char* _aligned(char* p) noexcept nogil:
    return p + ((-<Py_ssize_t>p) & 63)


cdef struct WindowJob:
    # a unidirectional stack, each part its batch rows through every layer,
    # window after window: the parts never wait for each other
    const QLayer* layers
    Py_ssize_t L, T, Tw, D0, H
    const float* x
    Py_ssize_t x_row_t, x_row_b  # the input's (and the output's) layout
    float* out
    float* buf[2]                # layers between: the window's rows, batch-major
    char* pscratch               # the projections' blocks
    Py_ssize_t nparts
    RecurJob rec                 # what every layer's recurrence shares
    bint own_input               # x is the model's own (forward's own_input)
    int bad                      # 1: a row of x is not finite; 2: the initial state
    Py_ssize_t ranges[MAX_PARTS][4]
    Interrupt interrupt


cdef void _window_job(void* arg, int part) noexcept nogil:
    cdef WindowJob* j = <WindowJob*>arg
    cdef Py_ssize_t b_lo = j.ranges[part][2], b_hi = j.ranges[part][3]
    cdef Py_ssize_t B = j.rec.B, GH = num_gates(j.rec.cell) * j.H
    cdef Py_ssize_t t0 = 0, steps, k, shift
    cdef ProjectJob pj
    cdef RecurJob rj
    cdef const QLayer* layer
    cdef const float* layer_in
    cdef float* gx_part
    if b_hi <= b_lo:
        return
    rj = j.rec
    rj.it = &j.interrupt
    rj.ranges[part][0], rj.ranges[part][1] = 0, 1
    rj.ranges[part][2], rj.ranges[part][3] = b_lo, b_hi
    # the part's own region of gx and of the layer buffers, from its row
    # b_lo * Tw: the rows of a window (batch-major, (b - b_lo) * steps + t -
    # t0) never reach another part's region, whatever window that part is in
    gx_part = j.rec.gx + b_lo * j.Tw * GH
    while t0 < j.T:
        steps = min(j.Tw, j.T - t0)
        shift = b_lo * (j.Tw - steps)    # the kernels add b_lo * steps rows
        layer_in = j.x
        for k in range(j.L):
            layer = &j.layers[k]
            _setup_project(&pj, layer_in, j.D0 if k == 0 else j.H, layer.w_ih, layer.bias_x,
                           gx_part, j.pscratch, j.nparts, max(j.D0, j.H))
            pj.it = &j.interrupt
            pj.inner = k > 0 or j.own_input
            if k == 0:
                pj.steps, pj.t0, pj.b0 = steps, t0, b_lo
                pj.x_row_t, pj.x_row_b = j.x_row_t, j.x_row_b
            pj.rows[part][0], pj.rows[part][1] = 0, (b_hi - b_lo) * steps
            _project_job(&pj, part)
            if pj.bad:
                j.bad = 1
                return
            rj.gx = gx_part - b_lo * steps * GH
            rj.t0, rj.T, rj.g_t0, rj.g_row_t, rj.g_row_b = t0, steps, t0, 1, steps
            rj.w[0], rj.wn[0], rj.bias_h = layer.w_hh[0], layer.w_hn[0], layer.bias_h
            rj.h = j.rec.h + k * B * j.H
            rj.c = NULL if j.rec.c == NULL else j.rec.c + k * B * j.H
            if k == j.L - 1:
                rj.out, rj.o_row_t, rj.o_row_b, rj.o_t0 = j.out, j.x_row_t, j.x_row_b, 0
            else:
                rj.out = j.buf[k % 2] + shift * j.H
                rj.o_row_t, rj.o_row_b, rj.o_t0 = 1, steps, t0
            _recur_job(&rj, part)
            if rj.bad:
                j.bad = 2
                return
            if interrupted(&j.interrupt):
                return
            layer_in = rj.out + b_lo * steps * j.H    # the part's rows, from 0
        t0 += steps


def forward(QStack stack not None, *, const float[:, ::1] x not None, Py_ssize_t T,
            bint batch_first, float[:, :, ::1] h not None, float[:, :, ::1] c,
            float[:, ::1] out not None, const int64_t[::1] lengths, parts, bint direct,
            Py_ssize_t window_bytes, bint own_state=False, bint own_input=False):
    """Every layer of ``stack`` on x (R = T * B rows in the input's order,
    D), h, c (layers * dirs, B, H) the initial state in and the final state
    out (c: LSTM only), out (R, dirs * H) the last layer's output, lengths
    (B,) or None, ``parts`` (d_lo, d_hi, b_lo, b_hi) one per thread.
    ``direct``: one part, small: run on this thread without the dispatch
    (and without polling for Ctrl-C). ``own_state``: h and c are the state
    the model carried from its last call (a Stream's, a Stateful's), its
    own values: not checked, a non-finite row propagates as it would have
    within one call; ``own_input``: so is x (a lower layer's output in a
    Sequential). Shapes are the caller's to check.
    Returns _run_stack's outcome."""
    if x.shape[0] == 0 or h.shape[1] == 0:
        return 0
    return _run_stack(stack, &x[0, 0], x.shape[0], T, h.shape[1], batch_first, &h[0, 0, 0],
                      NULL if c is None else &c[0, 0, 0], &out[0, 0],
                      NULL if lengths is None else &lengths[0], parts, direct, window_bytes,
                      own_state, own_input)


cdef int _run_stack(QStack stack, const float* x, Py_ssize_t R, Py_ssize_t T, Py_ssize_t B,
                    bint batch_first, float* h, float* c, float* out, const int64_t* lengths,
                    parts, bint direct, Py_ssize_t window_bytes,
                    bint own_state=False, bint own_input=False) except -1:
    """forward on C pointers (R, B >= 1), for it and QRunner.

    A unidirectional stack runs in time windows, every layer over the first
    steps whose input projections fit ``window_bytes``, then over the next,
    the state carried (the same arithmetic: each row is quantized alone), so
    a step's projection is read from the caches and no buffer grows with T;
    each part takes its batch rows through all of it alone. A bidirectional
    one runs layer by layer: the input projection of every row (the rows
    split between the parts), then the parts' directions and batch rows.

    Returns 0, or 1 if a row of x is not finite and not own_input, 2 if the
    initial state is not and not own_state (the outputs are then not
    meaningful)."""
    cdef ProjectJob pjob
    cdef RecurJob rjob
    cdef WindowJob wjob
    cdef Py_ssize_t H = stack.hidden_size, dirs = stack.dirs
    cdef Py_ssize_t G = num_gates(stack.cell), N = dirs * G * H
    cdef Py_ssize_t L = stack.num_layers, k, p, nparts = len(parts)
    cdef Py_ssize_t D_max = max(stack.input_size, dirs * H)
    cdef Py_ssize_t rows = dirs * B, qrow = _row_bytes(stack.kind, H)
    cdef Py_ssize_t Tw
    cdef Py_ssize_t in_row_t = 1 if batch_first else B, in_row_b = T if batch_first else 1
    cdef Py_ssize_t sizes[8]
    cdef char* base
    cdef char* ptr[8]
    cdef unsigned char[::1] scratch
    cdef const float* layer_in
    cdef float* layer_out
    cdef const QLayer* layer
    if nparts < 1 or nparts > MAX_PARTS:
        raise ValueError(f"forward: expected 1 to {MAX_PARTS} parts, got {nparts}")
    Tw = T if dirs == 2 else max(<Py_ssize_t>1, min(T, window_bytes // (B * N * 4)))
    # one scratch buffer: gx, two layer buffers, the recurrence's rows and
    # their scales, the GRU's recurrent gates, the activations, the
    # projection's blocks; each part 64-byte aligned
    sizes[0] = Tw * B * N * 4
    sizes[1] = Tw * B * dirs * H * 4 if L > 1 else 0
    sizes[2] = Tw * B * dirs * H * 4 if L > 2 else 0
    sizes[3] = rows * qrow
    sizes[4] = rows * 4
    sizes[5] = rows * G * H * 4 if stack.cell == GRU else 0
    sizes[6] = rows * 4 * H * 4
    sizes[7] = _project_scratch(D_max, N, nparts)
    total = 0
    for k in range(8):
        total += sizes[k] + 64
    scratch = np.empty(total + 64, np.uint8)
    base = _aligned(<char*>&scratch[0])
    for k in range(8):
        ptr[k] = base
        base = _aligned(base + sizes[k])
    rjob.cell = stack.cell
    rjob.B, rjob.H, rjob.dirs = B, H, dirs
    rjob.qrow = qrow
    rjob.gx = <float*>ptr[0]
    rjob.qbuf, rjob.sbuf = <int8_t*>ptr[3], <float*>ptr[4]
    rjob.gh = <float*>ptr[5] if stack.cell == GRU else NULL
    rjob.acts = <float*>ptr[6]
    rjob.lengths = lengths
    rjob.h = h
    rjob.c = c
    rjob.bad = 0
    rjob.own_state = own_state
    rjob.it = &rjob.interrupt

    if dirs == 1:
        wjob.layers, wjob.L, wjob.T, wjob.Tw = stack.layers, L, T, Tw
        wjob.D0, wjob.H = stack.input_size, H
        wjob.x, wjob.x_row_t, wjob.x_row_b = x, in_row_t, in_row_b
        wjob.out = out
        wjob.buf[0], wjob.buf[1] = <float*>ptr[1], <float*>ptr[2]
        wjob.pscratch, wjob.nparts = ptr[7], nparts
        wjob.rec = rjob
        wjob.bad = 0
        wjob.own_input = own_input
        if direct:
            wjob.interrupt.stop = 0
            wjob.interrupt.polls = False
            for p in range(4):
                wjob.ranges[0][p] = parts[0][p]
            with nogil:
                _window_job(&wjob, 0)
        else:
            run_parts(_window_job, &wjob, &wjob.ranges[0][0], 4, parts, &wjob.interrupt)
        return wjob.bad

    # bidirectional: one window, layer by layer; rows batch-major between layers
    rjob.t0, rjob.T, rjob.g_t0, rjob.g_row_t, rjob.g_row_b = 0, T, 0, 1, T
    project_parts = [(p * R // nparts, (p + 1) * R // nparts) for p in range(nparts)]
    if direct:
        pjob.interrupt.stop = rjob.interrupt.stop = 0
        pjob.interrupt.polls = rjob.interrupt.polls = False
        pjob.rows[0][0], pjob.rows[0][1] = 0, R
        for p in range(4):
            rjob.ranges[0][p] = parts[0][p]
    layer_in = x
    for k in range(L):
        layer = &stack.layers[k]
        _setup_project(&pjob, layer_in, stack.input_size if k == 0 else dirs * H,
                       layer.w_ih, layer.bias_x, rjob.gx, ptr[7], nparts, D_max)
        pjob.inner = k > 0 or own_input
        if k == 0:     # the input's rows, in its order
            pjob.steps, pjob.t0, pjob.b0 = T, 0, 0
            pjob.x_row_t, pjob.x_row_b = in_row_t, in_row_b
        if k == L - 1:  # the output, in the input's order
            layer_out = out
            rjob.o_row_t, rjob.o_row_b, rjob.o_t0 = in_row_t, in_row_b, 0
        else:
            layer_out = <float*>ptr[1 + k % 2]
            rjob.o_row_t, rjob.o_row_b, rjob.o_t0 = 1, T, 0
        rjob.w[0], rjob.w[1] = layer.w_hh[0], layer.w_hh[1]
        rjob.wn[0], rjob.wn[1] = layer.w_hn[0], layer.w_hn[1]
        rjob.bias_h = layer.bias_h
        rjob.h = h + k * dirs * B * H
        rjob.c = NULL if c == NULL else c + k * dirs * B * H
        rjob.out = layer_out
        if direct:
            with nogil:
                _project_job(&pjob, 0)
                if not pjob.bad:
                    _recur_job(&rjob, 0)
        else:
            run_parts(_project_job, &pjob, &pjob.rows[0][0], 2, project_parts,
                      &pjob.interrupt)
            if not pjob.bad:
                run_parts(_recur_job, &rjob, &rjob.ranges[0][0], 4, parts, &rjob.interrupt)
        if pjob.bad:
            return 1
        if rjob.bad:
            return 2
        layer_in = layer_out
    return 0


# --- the lean path of small calls ---

cdef class QRunner:
    """The lean path of a quantized layer's call and a quantized cell's step
    (fastrnn.quantized): a plain inference call that the plan would run on
    the calling thread in one part (``direct``), in one Cython call without
    the general path's per-call Python work (about 3 us of a batch-1 step's
    6; a cell's step, ``step``, 4 of 7).

    ``run(x, hx)`` returns None unless x is a C-contiguous, aligned float32
    ndarray in native byte order of the layer's input size, (T, B, D)
    ((B, T, D) batch-first) or unbatched (T, D), hx None or float32 ndarrays
    of the exact state shape (a tuple (h, c) for LSTM; copied, so any
    strides), the call's work (T B row_step_work, _plan.quantized_plan's)
    below max_work, a batch-1 call shorter than split_steps (from which the
    plan splits its hidden units), and every value finite; the caller then
    takes the general path, which validates, plans and reports."""
    cdef QStack stack
    cdef Py_ssize_t L, dirs, D, H, split_steps, window_bytes
    cdef bint batch_first, has_c
    cdef double row_step_work, max_work

    def __init__(self, QStack stack not None, bint batch_first, bint has_c,
                 double row_step_work, double max_work, Py_ssize_t split_steps,
                 Py_ssize_t window_bytes):
        self.stack = stack
        self.L, self.dirs = stack.num_layers, stack.dirs
        self.D, self.H = stack.input_size, stack.hidden_size
        self.row_step_work = row_step_work
        self.batch_first = batch_first
        self.has_c = has_c
        self.max_work = max_work
        self.split_steps = split_steps
        self.window_bytes = window_bytes

    def run(self, x, hx):
        cdef cnp.ndarray xa, out, h, c = None
        cdef cnp.npy_intp dims[3]
        cdef cnp.npy_intp sdims[3]
        cdef Py_ssize_t T, B
        cdef bint batched, batch_first, has_c = self.has_c
        cdef object states
        if not plain_input(x, cnp.NPY_FLOAT32, 2, 3, self.D):
            return None
        xa = <cnp.ndarray>x
        batched = cnp.PyArray_NDIM(xa) == 3
        batch_first = self.batch_first and batched
        if not batched:
            T, B = cnp.PyArray_DIM(xa, 0), 1
        elif batch_first:
            T, B = cnp.PyArray_DIM(xa, 1), cnp.PyArray_DIM(xa, 0)
        else:
            T, B = cnp.PyArray_DIM(xa, 0), cnp.PyArray_DIM(xa, 1)
        if (T == 0 or B == 0 or <double>T * B * self.row_step_work >= self.max_work
                or (B == 1 and T >= self.split_steps)):
            return None
        # the states: fresh arrays holding hx (or zeros)
        sdims[0], sdims[1], sdims[2] = self.L * self.dirs, B, self.H
        if not batched:
            sdims[1] = self.H
        states = initial_states(hx, has_c, cnp.NPY_FLOAT32, 3 if batched else 2, sdims)
        if states is None:
            return None
        h, c = states
        if batched:
            dims[0], dims[1] = cnp.PyArray_DIM(xa, 0), cnp.PyArray_DIM(xa, 1)
            dims[2] = self.dirs * self.H
        else:
            dims[0], dims[1] = T, self.dirs * self.H
        out = cnp.PyArray_EMPTY(3 if batched else 2, dims, cnp.NPY_FLOAT32, 0)
        if _run_stack(self.stack, <const float*>cnp.PyArray_DATA(xa), T * B, T, B, batch_first,
                      <float*>cnp.PyArray_DATA(h),
                      NULL if c is None else <float*>cnp.PyArray_DATA(c),
                      <float*>cnp.PyArray_DATA(out), NULL, [(0, self.dirs, 0, B)], True,
                      self.window_bytes):
            return None   # not finite: the general path reports it
        return (out, (h, c)) if has_c else (out, h)

    def step(self, x, hx):
        """A cell's step (a one-layer, one-direction stack): x (D,) or
        (B, D), hx None or float32 ndarrays of x's dimensions (H,) or (B, H)
        (a tuple (h, c) for LSTM). Returns the new state, or None where run
        would."""
        cdef cnp.ndarray xa, h, c
        cdef cnp.npy_intp sdims[2]
        cdef Py_ssize_t B, ndim
        cdef bint has_c = self.has_c
        cdef object states
        cdef float* out
        cdef int outcome
        if not plain_input(x, cnp.NPY_FLOAT32, 1, 2, self.D) or self.L != 1 or self.dirs != 1:
            return None
        xa = <cnp.ndarray>x
        ndim = cnp.PyArray_NDIM(xa)
        B = cnp.PyArray_DIM(xa, 0) if ndim == 2 else 1
        if B == 0 or B * self.row_step_work >= self.max_work:
            return None
        sdims[0] = B if ndim == 2 else self.H
        sdims[1] = self.H
        states = initial_states(hx, has_c, cnp.NPY_FLOAT32, ndim, sdims)
        if states is None:
            return None
        h, c = states
        out = <float*>PyMem_Malloc(B * self.H * sizeof(float))
        if out == NULL:
            raise MemoryError()
        try:
            outcome = _run_stack(self.stack, <const float*>cnp.PyArray_DATA(xa), B, 1, B, False,
                                 <float*>cnp.PyArray_DATA(h),
                                 NULL if c is None else <float*>cnp.PyArray_DATA(c), out, NULL,
                                 [(0, 1, 0, B)], True, self.window_bytes)
        finally:
            PyMem_Free(out)
        if outcome:
            return None   # not finite: the general path reports it
        return (h, c) if has_c else h


# --- threads on the hidden units (batch 1, or a few rows), a barrier per step ---

cdef struct UnitJob:
    # a unidirectional stack without lengths, window after window, every
    # layer: part p owns hidden units [bounds[p], bounds[p+1]) of every
    # gate, its columns of the input projection (gx) and of the recurrent
    # product, and its units of each step's output, for all B batch rows
    const QLayer* layers
    int cell
    Py_ssize_t L, T, B, Tw, D0, H, qrow_max
    Py_ssize_t row_t, row_b       # x's and out's row (t, b): t * row_t + b * row_b
    int nparts
    Py_ssize_t bounds[MAX_PARTS + 1]
    const float* x               # (T * B, D0)
    float* out                   # (T * B, H)
    float* buf[2]                # layers between: (Tw * B, H), time-major
    float* gx                    # (Tw * B, G * H), time-major
    float* h                     # (L, B, H): the state in and out
    float* c                     # (L, B, H), LSTM only
    char* scratch[MAX_PARTS]     # per part: _unit_scratch
    long long* sync              # the team's slots (team_slots), then stop_at:
                                 # the barrier after which every part stops (0: none)
    long long waits[MAX_PARTS]   # per part: ns waited at the barriers (team_barrier)
    int bad                      # 1: a row of x is not finite; 2: the state
    Py_ssize_t bad_c_layer       # the first layer whose c_0 is not finite (L: none),
                                 # found before the parts start (they write c in place)
    bint own_state               # the state is the model's own (forward's own_state)
    bint own_input               # so is x (forward's own_input)
    # NULL, or each part's weights packed on their own (forward_units'
    # part_weights): view ((k * nparts + p) * 2 + m) * G + g, m 0 for W_ih
    # and 1 for W_hh, gate g's rows of part p's units
    const QView* split
    Interrupt interrupt          # polled by part 0 (the calling thread)


cdef inline Py_ssize_t _unit_scratch(Py_ssize_t qrow_max, Py_ssize_t G, Py_ssize_t H,
                                     Py_ssize_t B) noexcept nogil:
    """Bytes of a part's scratch: PROJECT_BLOCK converted rows and their
    scales (B <= PROJECT_BLOCK: a step's rows convert at once), the
    activations of a row (4 H) and the GRU's recurrent gates (B rows of G H)."""
    return PROJECT_BLOCK * (qrow_max + 4) + (4 + B * G) * H * 4 + 64


cdef inline QView _columns(const QView* w, Py_ssize_t col0, Py_ssize_t n) noexcept nogil:
    """Columns [col0, col0 + n) of w: col0 on a block of 16 (the panels are
    block after block). The products read whole column groups from col0 on
    (and write only the n columns): the caller keeps those inside w's own
    groups (forward_units says how)."""
    cdef QView v = w[0]
    v.panels = w.panels + col0 // 16 * _row_bytes(w.kind, w.K) * 16
    v.comp = w.comp + col0
    v.scale = w.scale + col0
    v.N = n
    return v


cdef inline QView _part_view(const UnitJob* j, const QView* w, Py_ssize_t k, int part,
                             int m, Py_ssize_t g, Py_ssize_t lo, Py_ssize_t u) noexcept nogil:
    """Gate g's columns of part's units [lo, lo + u) of layer k's W_ih (m 0,
    w) or W_hh (m 1): the part's own packed rows, or w's columns."""
    if j.split != NULL:
        return j.split[((k * j.nparts + part) * 2 + m) * num_gates(j.cell) + g]
    return _columns(w, g * j.H + lo, u)


cdef inline bint _unit_barrier(UnitJob* j, int part, long long* done,
                               long long* waits) noexcept nogil:
    """Pass the next barrier; True when every part must stop there (Ctrl-C:
    team_barrier)."""
    done[0] += 1
    return team_barrier(j.sync, part, j.nparts, done[0], &j.interrupt, waits)


cdef inline float* _unit_row(const UnitJob* j, Py_ssize_t k, Py_ssize_t t0, Py_ssize_t st,
                             Py_ssize_t b) noexcept nogil:
    """Layer k's output row of step t0 + st (st within the window), batch row
    b: the caller's out for the last layer, else the window's buffer."""
    if k == j.L - 1:
        return j.out + ((t0 + st) * j.row_t + b * j.row_b) * j.H
    return j.buf[k % 2] + (st * j.B + b) * j.H


cdef inline const float* _unit_prev(const UnitJob* j, const float* h_k, Py_ssize_t k,
                                    Py_ssize_t t0, Py_ssize_t st, Py_ssize_t b) noexcept nogil:
    """Batch row b's h_{t-1} before step st of the window: the state (h_k,
    layer k's) at the window's first step, else the previous output row."""
    return h_k + b * j.H if st == 0 else _unit_row(j, k, t0, st - 1, b)


cdef void _unit_job(void* arg, int part) noexcept nogil:
    cdef UnitJob* j = <UnitJob*>arg
    cdef Py_ssize_t lo = j.bounds[part], u = j.bounds[part + 1] - j.bounds[part]
    cdef Py_ssize_t H = j.H, B = j.B, G = num_gates(j.cell), GH = G * H
    cdef int cell = j.cell
    cdef int8_t* q = <int8_t*>_aligned(j.scratch[part])
    cdef float* s = <float*>(q + PROJECT_BLOCK * j.qrow_max)
    cdef float* acts = s + PROJECT_BLOCK
    cdef float* gh = acts + 4 * H
    cdef Py_ssize_t t0 = 0, steps, k, g, st, r, n, i, b, D, qrow
    cdef long long done = 0, waits = 0
    cdef const QLayer* layer
    cdef const float* in_row
    cdef float* h_k
    cdef float* c_k
    cdef float* g_t
    cdef float* out_row
    cdef QView wk
    cdef unsigned int fpenv = fastrnn_flush_denormals()
    # every part reads the same rows (the inputs, the whole state), so all
    # find a non-finite one at the same place and leave together, at the
    # same places as forward's one part would (each window and layer: its
    # input projection, then its state)
    while t0 < j.T:
        steps = min(j.Tw, j.T - t0)
        for k in range(j.L):
            layer = &j.layers[k]
            D = j.D0 if k == 0 else H
            qrow = _row_bytes(layer.w_ih.kind, D)
            # this part's columns of the window's input projection, its rows
            # (step st, batch row b) at st * B + b
            r = 0
            while r < steps * B:
                n = min(<Py_ssize_t>PROJECT_BLOCK, steps * B - r)
                for i in range(n):
                    st = (r + i) // B
                    b = (r + i) - st * B
                    if k == 0:
                        in_row = j.x + ((t0 + st) * j.row_t + b * j.row_b) * D
                    else:
                        in_row = _unit_row(j, k - 1, t0, st, b)
                    s[i] = _input_row(layer.w_ih.kind, in_row, D, q + i * qrow,
                                      k > 0 or j.own_input, &j.bad)
                for g in range(G):
                    wk = _part_view(j, &layer.w_ih, k, part, 0, g, lo, u)
                    _product(&wk, n, q, qrow, s,
                             NULL if layer.bias_x == NULL else layer.bias_x + g * H + lo, 0,
                             j.gx + r * GH + g * H + lo, GH)
                r += n
            h_k = j.h + k * B * H
            c_k = NULL if j.c == NULL else j.c + k * B * H
            qrow = _row_bytes(layer.w_hh[0].kind, H)
            if t0 == 0 and not j.bad and not j.own_state:   # the caller's state (later,
                                                            # the call's own)
                for b in range(B):
                    if _row(layer.w_hh[0].kind, h_k + b * H, H, q) < 0:
                        j.bad = 2
                if k == j.bad_c_layer:
                    j.bad = 2
            if j.bad:
                t0 = j.T        # stop: every part decided alike
                break
            # the steps: h_{t-1} is the output's previous row (the state at
            # a window's first step), read whole; this part writes its units
            for st in range(steps):
                g_t = j.gx + st * B * GH
                for b in range(B):
                    s[b] = _inner_row(layer.w_hh[0].kind, _unit_prev(j, h_k, k, t0, st, b),
                                      H, q + b * qrow)
                for g in range(G):
                    wk = _part_view(j, &layer.w_hh[0], k, part, 1, g, lo, u)
                    if cell == GRU:
                        _product(&wk, B, q, qrow, s,
                                 NULL if layer.bias_h == NULL else layer.bias_h + g * H + lo,
                                 0, gh + g * H + lo, GH)
                    else:
                        _product(&wk, B, q, qrow, s, g_t + g * H + lo, GH, g_t + g * H + lo,
                                 GH)
                for b in range(B):
                    out_row = _unit_row(j, k, t0, st, b)
                    if cell == LSTM:
                        lstm_row(g_t + b * GH + lo, out_row + lo, c_k + b * H + lo,
                                 out_row + lo, acts, u, H)
                    elif cell == GRU:
                        gru_row(g_t + b * GH + lo, gh + b * GH + lo,
                                _unit_prev(j, h_k, k, t0, st, b) + lo, out_row + lo,
                                out_row + lo, acts, u, H)
                    else:
                        rnn_row(g_t + b * GH + lo, out_row + lo, out_row + lo, acts, u,
                                cell == RNN_RELU)
                if _unit_barrier(j, part, &done, &waits):
                    break
            else:
                # the state for the next window, then a barrier: no part reads
                # it whole before every part wrote its units
                for b in range(B):
                    memcpy(h_k + b * H + lo, _unit_row(j, k, t0, steps - 1, b) + lo,
                           u * sizeof(float))
                if not _unit_barrier(j, part, &done, &waits):
                    continue
            t0 = j.T            # interrupted: every part stops at the same barrier
            break
        t0 += steps
    j.waits[part] = waits
    fastrnn_amx_release()
    fastrnn_restore_fpenv(fpenv)


def forward_units(QStack stack not None, *, const float[:, ::1] x not None,
                  float[:, :, ::1] h not None, float[:, :, ::1] c, float[:, ::1] out not None,
                  bounds, Py_ssize_t window_bytes, bint batch_first=False,
                  long long wait_ns, bint own_state=False, bint own_input=False,
                  part_weights=None):
    """``forward`` of a unidirectional stack without lengths (x (T * B, D),
    h, c (L, B, H), out (T * B, H); rows time-major, or batch-major with
    batch_first) on n threads: part p the hidden units [bounds[p],
    bounds[p + 1]) (0 = b_0 < b_1 < ... < b_n = H, n from 2 to MAX_PARTS),
    part 0 here and the others on workers, all meeting at a barrier after
    every step. The same arithmetic per unit as ``forward`` (each part
    converts the whole h_{t-1} rows as forward does, and a product's columns
    do not depend on each other), so the same bits. H a multiple of 16 and
    the inner bounds of 64: each gate's columns of a part start on a block
    of the packed weights and every part but the last computes whole column
    groups; the last part's end at the gate's end: its last group reads the
    next gate's first blocks and writes only its own columns. In the last
    gate that group must end where the matrix's padding to whole groups
    does (the packed weights, column terms and scales end there): (gates -
    1) * H + b_(n-1) a multiple of 64, which the plan checks too
    (``units_fit``). Any other split (bounds on multiples of 16) takes
    ``part_weights``: per layer, per part, (W_ih's, W_hh's) QWeights of each
    gate's rows of the part's units (``unit_weights``), which each part then
    multiplies; the same sums, so the same bits. B <= 64 (a step's rows
    convert at once). Not for the reset-before GRU (its n product needs all
    of r * h mid-step).

    own_state, own_input as ``forward``'s.

    Returns (ran, outcome): ran 0 when the workers were owned by another
    call or did not all take their parts within wait_ns (nothing done: run
    ``forward``), 1 when done, 2 when done but the parts often waited for
    each other (they shared cores); outcome as ``forward``'s."""
    cdef UnitJob job
    cdef long long sync_raw[TEAM_SYNC + 16]
    cdef Py_ssize_t H = stack.hidden_size, L = stack.num_layers, B = h.shape[1], T
    cdef Py_ssize_t G = num_gates(stack.cell)
    cdef Py_ssize_t n = len(bounds) - 1, p, k, m, g
    cdef Py_ssize_t sizes[3]
    cdef Py_ssize_t part_bytes
    cdef unsigned char[::1] scratch
    cdef unsigned char[::1] views
    cdef QView* split = NULL
    cdef QWeight qw
    cdef char* base
    cdef int ran
    if (stack.dirs != 1 or stack.cell == GRU_RESET_BEFORE or not 1 <= B <= PROJECT_BLOCK
            or not unit_bounds_fit(bounds, H, 16)):
        raise ValueError(f"forward_units: expected a unidirectional stack (not the "
                         f"reset-before GRU), bounds rising from 0 to H in 2 to {MAX_PARTS} "
                         f"parts, each inner one a multiple of 16, 1 <= B <= {PROJECT_BLOCK}; "
                         f"got dirs={stack.dirs}, H={H}, bounds={list(bounds)}, B={B}")
    if part_weights is None and not units_fit(G, H, bounds, B):
        raise ValueError(f"forward_units: without part_weights, expected H a multiple of 16 and "
                         f"the inner bounds and (gates - 1) * H + the last inner one multiples "
                         f"of 64 (each part's columns on the packed weights' column groups); "
                         f"got gates={G}, H={H}, bounds={list(bounds)}")
    if part_weights is not None:
        if (len(part_weights) != L or any(len(parts) != n for parts in part_weights)
                or any(len(pair) != 2 for parts in part_weights for pair in parts)):
            raise ValueError(f"forward_units: expected part_weights for {L} layers of {n} "
                             f"parts, each a pair (W_ih's, W_hh's)")
        views = np.empty(L * n * 2 * G * sizeof(QView), np.uint8)
        split = <QView*>&views[0]
        for k in range(L):
            for p in range(n):
                for m in range(2):
                    if len(part_weights[k][p][m]) != G:
                        raise ValueError(f"forward_units: expected {G} gates' weights")
                    for g in range(G):
                        if not isinstance(part_weights[k][p][m][g], QWeight):
                            raise TypeError(f"forward_units: part_weights hold QWeights, got "
                                            f"{type(part_weights[k][p][m][g]).__name__}")
                        qw = part_weights[k][p][m][g]
                        if (qw.kind != stack.kind or qw.N != bounds[p + 1] - bounds[p]
                                or qw.K != (stack.input_size if m == 0 and k == 0 else H)):
                            raise ValueError(f"forward_units: part_weights[{k}][{p}] do not "
                                             f"fit the bounds")
                        split[((k * n + p) * 2 + m) * G + g] = qw.view
    T = x.shape[0] // B
    states = ((h.shape[0], h.shape[1], h.shape[2]),
              None if c is None else (c.shape[0], c.shape[1], c.shape[2]))
    if (x.shape[0] != T * B or x.shape[1] != stack.input_size or out.shape[0] != T * B
            or out.shape[1] != H
            or states != ((L, B, H), (L, B, H) if stack.cell == LSTM else None)):
        raise ValueError(f"forward_units: expected x (T * B, {stack.input_size}), out (T * B, "
                         f"{H}), h (and c, LSTM only) ({L}, B, {H}); got x ({x.shape[0]}, "
                         f"{x.shape[1]}), out ({out.shape[0]}, {out.shape[1]}), h and c {states}")
    if T == 0:
        return 1, 0
    job.layers, job.cell, job.L, job.T, job.B = stack.layers, stack.cell, L, T, B
    if batch_first:
        job.row_t, job.row_b = 1, T
    else:
        job.row_t, job.row_b = B, 1
    job.D0, job.H = stack.input_size, H
    job.Tw = max(<Py_ssize_t>1, min(T, window_bytes // (B * G * H * 4)))
    job.qrow_max = _row_bytes(stack.kind, max(stack.input_size, H))
    job.nparts = <int>n
    for p in range(n + 1):
        job.bounds[p] = bounds[p]
    # gx, two layer buffers, each part's scratch; each 64-byte aligned
    sizes[0] = job.Tw * B * G * H * 4
    sizes[1] = job.Tw * B * H * 4 if L > 1 else 0
    sizes[2] = job.Tw * B * H * 4 if L > 2 else 0
    part_bytes = _unit_scratch(job.qrow_max, G, H, B)
    scratch = np.empty(sizes[0] + sizes[1] + sizes[2] + n * (part_bytes + 64) + 4 * 64,
                       np.uint8)
    base = _aligned(<char*>&scratch[0])
    job.gx = <float*>base
    base = _aligned(base + sizes[0])
    job.buf[0] = <float*>base
    base = _aligned(base + sizes[1])
    job.buf[1] = <float*>base
    base = _aligned(base + sizes[2])
    for p in range(n):
        job.scratch[p] = base
        base = _aligned(base + part_bytes)
    job.x, job.out = &x[0, 0], &out[0, 0]
    job.h = &h[0, 0, 0]
    job.c = NULL if c is None else &c[0, 0, 0]
    job.bad = 0
    job.own_state = own_state
    job.own_input = own_input
    job.split = split
    job.bad_c_layer = L
    if c is not None and not own_state:
        finite = np.isfinite(np.asarray(c)).reshape(L, -1).all(axis=1)
        if not finite.all():
            job.bad_c_layer = int(np.argmin(finite))
    job.sync = team_slots(sync_raw, job.nparts)
    for p in range(n):
        job.waits[p] = 0
    interrupt_start(&job.interrupt)
    with nogil:
        ran = run_team(_unit_job, &job, job.nparts, wait_ns, job.waits)
    if not ran:
        return 0, 0
    raise_if_interrupted(&job.interrupt)   # the outputs and the state are then partial
    return ran, job.bad


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
            s[i] = fastrnn_q_row(&x[i, 0], K, &buf[i, 0], NULL)
    q = np.asarray(buf)[:, :K].view(np.uint8).astype(np.int16) if FASTRNN_Q_OFFSET else \
        np.asarray(buf)[:, :K].astype(np.int16)
    return (q - FASTRNN_Q_OFFSET).astype(np.int8), np.asarray(s)


def bf16_rows(const float[:, ::1] x not None):
    """Each row of x converted to bfloat16 as the kernels convert
    activations: uint16 bit patterns (M, K)."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], i
    cdef Py_ssize_t qrow = fastrnn_b_pairs(K) * 4
    cdef int8_t[:, ::1] buf = np.empty((M, qrow), np.int8)
    with nogil:
        for i in range(M):
            fastrnn_b_row(&x[i, 0], K, &buf[i, 0], NULL)
    return np.asarray(buf).view(np.uint16)[:, :K].copy()


def bf16_product(const float[:, ::1] x not None, QWeight w not None):
    """y (M, N) = x (M, K) converted to bf16 row by row, times W^T (a
    bfloat16 QWeight), as the kernels compute it."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], i
    cdef Py_ssize_t qrow = fastrnn_b_pairs(K) * 4
    cdef int8_t[:, ::1] buf = np.empty((max(M, 1), qrow), np.int8)
    cdef float[:, ::1] y = np.empty((max(M, 1), w.N), np.float32)
    if K != w.K or w.kind != 1:
        raise ValueError(f"bf16_product: expected a bfloat16 QWeight of {K} columns")
    with nogil:
        for i in range(M):
            fastrnn_b_row(&x[i, 0], K, &buf[i, 0], NULL)
        if M > 0:
            fastrnn_b_gemm(M, K, &buf[0, 0], qrow, w.view.panels, w.N, NULL, 0, &y[0, 0], w.N)
        fastrnn_amx_release()
    return np.asarray(y)[:M].copy()


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
        fastrnn_amx_release()
    return np.asarray(c)[:, :w.N].copy()


# --- what the machine and the int8 kernel reach (fastrnn bench --dtype int8) ---

def int8_peak_gops(double seconds=0.25):
    """One thread's int8 multiply-add peak on this build's product
    instruction (VNNI's vpdpbusd, AVX2's vpmaddubsw sequence), G integer
    ops a second (2 per multiply-add, as float32's flops): the best of 5
    timings of a register-only loop (_qkernel.h: fastrnn_q_peak_loop) of
    about seconds / 5 each. NaN in the portable build, which has no such
    instruction; on AMX the products run on the tiles, not measured here."""
    from fastrnn._forward import _best_time
    cdef int32_t sink = 0

    def run(long long iters):
        nonlocal sink
        with nogil:
            fastrnn_q_peak_loop(iters, &sink)

    if FASTRNN_Q_PEAK_MACS == 0:
        return float("nan")
    iters, best = _best_time(run, seconds)
    return iters * 2.0 * FASTRNN_Q_PEAK_MACS / best / 1e9


def int8_product_gops(Py_ssize_t M, Py_ssize_t K, Py_ssize_t N, double seconds=0.25):
    """The int8 product kernel alone on one thread, G integer ops a second:
    y (M, N) = add + the int32 sums of M quantized rows of K by a packed
    W (N, K), dequantized (a step's recurrent product of M batch rows,
    K = H, N = G * H), the best of 5 timings of repeated products of about
    seconds / 5 each."""
    from fastrnn._forward import _best_time
    if not (1 <= M and 1 <= N and 1 <= K <= FASTRNN_Q_MAX_K):
        raise ValueError(f"int8_product_gops: expected M, N >= 1 and 1 <= K <= "
                         f"{FASTRNN_Q_MAX_K}, got M={M}, K={K}, N={N}")
    rng = np.random.default_rng(0)
    cdef QWeight w = QWeight(rng.integers(-127, 128, (N, K), dtype=np.int8),
                             np.full(N, 0.01, np.float32))
    cdef Py_ssize_t qrow = fastrnn_q_quads(K) * 4
    # quantized rows as the kernels store them (VNNI: offset to uint8)
    q = rng.integers(-127, 128, (M, qrow)) + FASTRNN_Q_OFFSET
    cdef int8_t[:, ::1] a = (q & 0xFF).astype(np.uint8).view(np.int8)
    cdef float[::1] rs = np.full(M, 0.01, np.float32)
    cdef float[:, ::1] add = rng.uniform(-1, 1, (M, N)).astype(np.float32)
    cdef float[:, ::1] y = np.empty((M, N), np.float32)

    def run(long long reps):
        cdef long long i
        with nogil:
            for i in range(reps):
                fastrnn_q_gemm_dequant(M, K, &a[0, 0], qrow, w.view.panels, w.view.comp, N,
                                       &rs[0], w.view.scale, &add[0, 0], N, &y[0, 0], N)
            fastrnn_amx_release()

    reps, best = _best_time(run, seconds)
    return reps * 2.0 * M * K * N / best / 1e9


def activations(*, const float[::1] x not None, float[::1] sigmoid_out not None,
                float[::1] tanh_out not None):
    """The float32 sigmoid and tanh exactly as this module's gate pass
    computes them (its build's flags), elementwise over x."""
    cdef Py_ssize_t j
    cdef float lim = read_exp_max()
    with nogil:
        for j in range(x.shape[0]):
            sigmoid_out[j] = sigmoid_lim(x[j], lim)
        for j in range(x.shape[0]):
            tanh_out[j] = tanh_lim(x[j], lim)
