# Forward kernels of a layer (or a cell: a layer with T = 1): ``project``, the
# input projection of every step and direction in one GEMM, then ``recur``,
# the time loops of a range of directions and batch rows (two such ranges
# may run in parallel threads).
#
# Layout. Every per-step buffer is a block of R = T * B rows in one row
# order, the input's: time-major (row t * B + b) or batch-first (row
# b * T + t), so batch-first input is never transposed. Step t, batch b is
# row t * row_t + b * row_b; direction d owns a column block of each buffer.
#   x    (R, D)            layer input
#   gx   (R, dirs * G * H) input projection of every row and direction: one
#                          GEMM before the loop
#   out  (R, dirs * H)     h of every step
#   acts (R, dirs * S * H) activations saved for backward; in inference a
#                          scratch (B, dirs * S * H), one row per batch row
#   h_prev, c_prev (R, dirs * H) training only: the state before each step
#
# Per step: one recurrent product (gemv at batch 1) accumulated into the
# step's rows of gx (GRU: into a (B, 3H) workspace, since r multiplies only
# the recurrent part of n), then one fused pass over the rows. The
# reset-before GRU needs r before its n product: the r, z product into gx,
# a pass writing r, z and r * h to acts, the n product of r * h into gx,
# then the pass that finishes the rows. The state
# arrays h, c are updated in place and end as h_n, c_n.
#
# Variable lengths: row b is active at step t iff t < lengths[b]. An inactive
# row keeps its state and gets a zero output, which gives PyTorch's packed
# semantics in both directions (the reverse direction of a short sequence
# starts from h0 at its own last step).

cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cython cimport floating
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

import numpy as np

cnp.import_array()

from fastrnn._worker cimport (Interrupt, MAX_PARTS, interrupted, interrupt_block_rows,
                             run_team, run_parts)
from fastrnn._microkernel cimport (Packed, FASTRNN_MK_FROM_C, FASTRNN_MK_FROM_ROW,
                                  FASTRNN_MK_ZERO, FASTRNN_MK_ISA, FASTRNN_MK_LANES,
                                  FASTRNN_MK_MAX_NV, FASTRNN_MK_PEAK_CHAINS, fastrnn_mk_fma_loop,
                                  fastrnn_mk_pack, fastrnn_mk_packed_size, fastrnn_mk_groups,
                                  aligned_float32, packed_product, packed_product_groups,
                                  unit_blocks_per_group, describe_packed)
from fastrnn._blas cimport (gemm, gemv, step_block, one_thread_block, GEMM_ONE_THREAD_MNK,
                           GEMV_ONE_THREAD_MN)
from fastrnn._gates cimport (RNN_TANH, RNN_RELU, GRU, LSTM, GRU_RESET_BEFORE, RNN_OPT, GRU_OPT,
                             GRU_RESET_BEFORE_OPT, LSTM_OPT, base_cell, num_gates, num_saved,
                             rnn_row, gru_row, gru_reset_gates_row, gru_reset_row, lstm_row,
                             sigmoid, tanh_, axpy_product, GateOptions, rnn_opt_row,
                             gru_opt_row, gru_reset_gates_opt_row, gru_reset_opt_row,
                             lstm_opt_row, Zoneout, zone_part, RecurrentDropout, dropout_part,
                             LayerExtras, fill_extras, options_part, OPTION_ROW, ACT_SIGMOID,
                             ACT_TANH, ACT_RELU, ACT_AFFINE, ACT_LEAKY_RELU,
                             ACT_THRESHOLDED_RELU, ACT_SCALED_TANH, ACT_HARD_SIGMOID, ACT_ELU,
                             ACT_SOFTSIGN, ACT_SOFTPLUS, AXPY_MAX, fastrnn_flush_denormals,
                             fastrnn_restore_fpenv)

# exported to Python so that the cell codes are defined once
CELL_RNN_TANH = RNN_TANH
CELL_RNN_RELU = RNN_RELU
CELL_GRU = GRU
CELL_LSTM = LSTM
CELL_GRU_RESET_BEFORE = GRU_RESET_BEFORE
CELL_RNN_OPT = RNN_OPT
CELL_GRU_OPT = GRU_OPT
CELL_GRU_RESET_BEFORE_OPT = GRU_RESET_BEFORE_OPT
CELL_LSTM_OPT = LSTM_OPT
# and the bounds under which the kernels' BLAS calls stay on one thread, and
# below which a batch-1 step is a loop (_parallel.hold_blas reads them)
GEMM_ONE_THREAD = GEMM_ONE_THREAD_MNK
GEMV_ONE_THREAD = GEMV_ONE_THREAD_MN
AXPY_LIMIT = AXPY_MAX


cdef void _project_inputs(const floating* x, Py_ssize_t rows, Py_ssize_t D,
                          const floating* w_ih, const Packed* packed, Py_ssize_t N,
                          const floating* bias, floating* gx,
                          Py_ssize_t max_rows, Interrupt* interrupt) noexcept nogil:
    """gx (rows, N) = x (rows, D) @ w_ih^T + bias, in blocks of <= max_rows rows
    (interrupt_block_rows when the call can be interrupted, NULL: never).
    packed (float32): each direction's W_ih packed for the micro-kernel
    (``pack_projection``), which then runs the product: every element one
    chain from its bias, so a row's values never depend on the other rows."""
    cdef Py_ssize_t r, start, n_rows, d, GH = 0, dirs = 0
    cdef floating beta = 0
    cdef bint on_kernel = floating is float and packed != NULL
    if on_kernel:
        GH = packed.gates * packed.units
        dirs = N // GH
    elif bias != NULL:
        beta = 1
        for r in range(rows):
            memcpy(gx + r * N, bias, N * sizeof(floating))
    if interrupt != NULL:
        max_rows = interrupt_block_rows(N * D, max_rows)
    start = 0
    while start < rows:
        if interrupted(interrupt, True):
            return
        n_rows = min(max_rows, rows - start)
        if floating is float and on_kernel:
            for d in range(dirs):
                packed_product(n_rows, x + start * D, D, 1, packed + d, gx + start * N + d * GH,
                               N, packed.units,
                               FASTRNN_MK_ZERO if bias == NULL else FASTRNN_MK_FROM_ROW,
                               NULL if bias == NULL else bias + d * GH)
        else:
            gemm(False, True, <int>n_rows, <int>N, <int>D, <floating>1,
                 x + start * D, <int>D, w_ih, <int>D, beta, gx + start * N, <int>N)
        start += n_rows


cdef void _recurrent_product(Py_ssize_t B, Py_ssize_t GH, Py_ssize_t H,
                             const floating* h, Py_ssize_t ldh, const floating* w_hh,
                             const floating* w_hh_t, Py_ssize_t ld_t,
                             floating* g, Py_ssize_t ldg, Py_ssize_t cols) noexcept nogil:
    """g (B, GH; rows ldg apart) += h (B, H; rows ldh apart) @ w_hh^T, ``cols`` gate columns
    per BLAS call (see _blas.step_block). Batch 1: gemv on w_hh (GH, H);
    larger batches: gemm on its transpose w_hh_t (H, GH; rows ld_t apart),
    which OpenBLAS multiplies faster (no transposed operand)."""
    cdef Py_ssize_t start, n
    cdef floating one = 1
    if B == 1 and GH * H <= AXPY_MAX:
        axpy_product(h, H, w_hh_t, ld_t, GH, g)
        return
    start = 0
    while start < GH:
        n = min(cols, GH - start)
        if B == 1:
            gemv(False, <int>n, <int>H, one, w_hh + start * H, <int>H, h, one, g + start)
        else:
            gemm(False, False, <int>B, <int>n, <int>H, one, h, <int>ldh,
                 w_hh_t + start, <int>ld_t, one, g + start, <int>ldg)
        start += n


cdef void _dropped_product(int kind, Py_ssize_t B, Py_ssize_t H, const floating* h,
                          const RecurrentDropout* drop, const floating* w_hh_t,
                          Py_ssize_t ld_t, const floating* b_hh, floating* gh, floating* g_t,
                          Py_ssize_t ldg) noexcept nogil:
    """A step's recurrent products under Keras' recurrent dropout: gate block
    g reads h * mask_g (the GRU's into gh after its bias, the others' into
    g_t). The reset-before GRU's r, z only: its n product follows the first
    gate pass (it reads r * h * mask_n)."""
    cdef Py_ssize_t G = num_gates(kind), gate, b, j
    cdef floating* scratch = <floating*>drop.scratch
    cdef const floating* mask
    cdef floating* out = g_t
    cdef Py_ssize_t ldo = ldg
    if kind == GRU:
        for b in range(B):
            if b_hh != NULL:
                memcpy(gh + b * G * H, b_hh, G * H * sizeof(floating))
            else:
                memset(gh + b * G * H, 0, G * H * sizeof(floating))
        out, ldo = gh, G * H
    for gate in range(2 if kind == GRU_RESET_BEFORE else G):
        mask = <const floating*>drop.mask + gate * drop.gate_stride
        for b in range(B):
            for j in range(H):
                scratch[b * H + j] = h[b * H + j] * mask[b * H + j]
        if floating is float and drop.packs != NULL:
            packed_product(B, scratch, H, 1, &drop.packs[gate], out + gate * H, ldo, H,
                           FASTRNN_MK_FROM_C, NULL)
        else:
            gemm(False, False, <int>B, <int>H, <int>H, <floating>1, scratch, <int>H,
                 w_hh_t + gate * H, <int>ld_t, <floating>1, out + gate * H, <int>ldo)


cdef inline void _scale_row(floating* v, const floating* by, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        v[j] = v[j] * by[j]


cdef inline void _opt_row(int cell, floating* g, const floating* gh, floating* h,
                          floating* c, floating* out, floating* acts, Py_ssize_t H,
                          const GateOptions* opts, const floating* peep) noexcept nogil:
    """The gate pass of one row of a *_OPT kind (_gates.pxd)."""
    if cell == LSTM_OPT:
        lstm_opt_row(g, h, c, out, acts, H, opts, peep)
    elif cell == GRU_OPT:
        gru_opt_row(g, gh, h, h, out, acts, H, opts)
    elif cell == GRU_RESET_BEFORE_OPT:
        gru_reset_opt_row(g, h, out, acts, H, opts)
    else:
        rnn_opt_row(g, h, out, acts, H, opts)


cdef struct Fold:
    # one direction and batch range of a folded call (recur's ``folded``)
    const float* x          # the layer input at the range's first row, D columns
    Py_ssize_t D
    const float* bias       # the direction's input-projection bias, or NULL
    float* xh               # (B, D + H): each row's [x_t, h_{t-1}]


cdef inline void _folded_product(const Fold* f, Py_ssize_t t, Py_ssize_t B, Py_ssize_t H,
                                 Py_ssize_t row_t, Py_ssize_t row_b, const float* h,
                                 const Packed* packed, float* g_t,
                                 Py_ssize_t ldg) noexcept nogil:
    """g_t (B rows, ldg apart) = bias + [x_t, h] @ [W_ih, W_hh]^T, packed
    ``pack_folded``'s: the step's product with the input projection folded
    in. Each element is the chain project then the step's product would run
    (bias, the x terms, the h terms), so the same bits, without a window's
    projection written out of L2 and read back step by step."""
    cdef Py_ssize_t b, K = f.D + H
    for b in range(B):
        memcpy(f.xh + b * K, f.x + (t * row_t + b * row_b) * f.D, f.D * sizeof(float))
        memcpy(f.xh + b * K + f.D, h + b * H, H * sizeof(float))
    packed_product(B, f.xh, K, 1, packed, g_t, ldg, H,
                   FASTRNN_MK_ZERO if f.bias == NULL else FASTRNN_MK_FROM_ROW, f.bias)


cdef void _run_direction(int cell, bint reverse, Py_ssize_t T, Py_ssize_t B,
                         Py_ssize_t H, Py_ssize_t dirs,
                         Py_ssize_t row_t, Py_ssize_t row_b,
                         floating* gx, const floating* w_hh, const floating* w_hh_t,
                         const Packed* packed, const floating* b_hh,
                         floating* h, floating* c, floating* gh, floating* out,
                         floating* acts, Py_ssize_t acts_t, Py_ssize_t acts_b,
                         floating* h_prev, floating* c_prev,
                         const int64_t* lengths, Py_ssize_t cols,
                         Interrupt* interrupt, const GateOptions* opts,
                         const floating* peep, const Zoneout* zone,
                         const RecurrentDropout* drop, const Fold* fold) noexcept nogil:
    """One direction over all steps for B batch rows. Every buffer pointer is
    already offset to this direction's column block and the first batch row;
    row_t, row_b step between the rows of (t, b). acts: row (t, b) at
    t * acts_t + b * acts_b (acts_t = 0 for the inference scratch). Leaves
    early, its outputs partial, when the call is interrupted (NULL: never).
    packed: this direction's W_hh packed for the micro-kernel (float32; the
    reset-before GRU's r, z rows then its n rows), or NULL to multiply
    through BLAS. opts, peep: the *_OPT kinds' options and the LSTM's
    peephole weights of this direction (else NULL). zone: this direction's
    zoneout (see Zoneout) or NULL. drop: its recurrent dropout (training) or
    NULL: each gate block's product then reads h times its own mask, through
    BLAS. fold (float32, or NULL): the step's product takes in the input
    projection (_folded_product; packed is then pack_folded's, gx receives
    each step's pre-activations, ``project`` was not run)."""
    cdef int kind = base_cell(cell)
    cdef Py_ssize_t GH = num_gates(cell) * H
    cdef Py_ssize_t gx_cols = dirs * GH
    cdef Py_ssize_t h_cols = dirs * H
    cdef Py_ssize_t s, t, b, row
    cdef floating* g_t
    cdef floating* out_row
    cdef floating* acts_row
    cdef floating* h_old
    cdef floating* c_old
    for s in range(T):
        if interrupted(interrupt):
            return
        t = T - 1 - s if reverse else s
        g_t = gx + t * row_t * gx_cols

        if h_prev != NULL:  # training: keep the state this step starts from
            for b in range(B):
                row = t * row_t + b * row_b
                memcpy(h_prev + row * h_cols, h + b * H, H * sizeof(floating))
                if c_prev != NULL:
                    memcpy(c_prev + row * h_cols, c + b * H, H * sizeof(floating))
        elif zone != NULL:  # inference with zoneout: the old state, to blend
            for b in range(B):
                memcpy(<floating*>zone.keep + 2 * b * H, h + b * H, H * sizeof(floating))
                if c != NULL:
                    memcpy(<floating*>zone.keep + (2 * b + 1) * H, c + b * H,
                           H * sizeof(floating))

        # recurrent product
        if floating is float and fold != NULL:
            _folded_product(fold, t, B, H, row_t, row_b, h, packed, g_t, row_b * gx_cols)
        elif drop != NULL and kind != GRU_RESET_BEFORE:
            _dropped_product(kind, B, H, h, drop, w_hh_t, dirs * GH, b_hh, gh, g_t,
                             row_b * gx_cols)
        elif kind == GRU:
            for b in range(B):
                if b_hh != NULL:
                    memcpy(gh + b * GH, b_hh, GH * sizeof(floating))
                else:
                    memset(gh + b * GH, 0, GH * sizeof(floating))
            if floating is float and packed != NULL:
                packed_product(B, h, H, 1, packed, gh, GH, H, FASTRNN_MK_FROM_C, NULL)
            else:
                _recurrent_product(B, GH, H, h, H, w_hh, w_hh_t, dirs * GH, gh, GH, cols)
        elif kind == GRU_RESET_BEFORE:
            # r, z; then n from r * h, computed for every row (a row past its
            # length gets values it never uses, and the product needs them all)
            if drop != NULL:
                _dropped_product(kind, B, H, h, drop, w_hh_t, dirs * GH, b_hh, gh, g_t,
                                 row_b * gx_cols)
            elif floating is float and packed != NULL:
                packed_product(B, h, H, 1, packed, g_t, row_b * gx_cols, H,
                               FASTRNN_MK_FROM_C, NULL)
            else:
                _recurrent_product(B, 2 * H, H, h, H, w_hh, w_hh_t, dirs * GH, g_t,
                                   row_b * gx_cols, cols)
            for b in range(B):
                row = t * row_t + b * row_b
                if opts != NULL:
                    gru_reset_gates_opt_row(gx + row * gx_cols, h + b * H,
                                            acts + t * acts_t + b * acts_b, H, opts)
                else:
                    gru_reset_gates_row(gx + row * gx_cols, h + b * H,
                                        acts + t * acts_t + b * acts_b, H)
            if drop != NULL:   # (Keras: the n product reads r * h * mask_n)
                for b in range(B):
                    _scale_row(acts + t * acts_t + b * acts_b + 3 * H,
                               <const floating*>drop.mask + 2 * drop.gate_stride + b * H, H)
            if floating is float and packed != NULL:
                packed_product(B, acts + t * acts_t + 3 * H, acts_b, 1, packed + 1, g_t + 2 * H,
                               row_b * gx_cols, H, FASTRNN_MK_FROM_C, NULL)
            else:
                _recurrent_product(B, H, H, acts + t * acts_t + 3 * H, acts_b,
                                   w_hh + 2 * H * H, w_hh_t + 2 * H, dirs * GH, g_t + 2 * H,
                                   row_b * gx_cols, cols)
        elif floating is float and packed != NULL:
            packed_product(B, h, H, 1, packed, g_t, row_b * gx_cols, H, FASTRNN_MK_FROM_C,
                           NULL)
        else:
            _recurrent_product(B, GH, H, h, H, w_hh, w_hh_t, dirs * GH, g_t, row_b * gx_cols,
                               cols)

        # fused gate pass, row by row
        for b in range(B):
            row = t * row_t + b * row_b
            out_row = out + row * h_cols
            if lengths != NULL and t >= lengths[b]:
                memset(out_row, 0, H * sizeof(floating))
                continue
            acts_row = acts + t * acts_t + b * acts_b
            if opts != NULL:
                _opt_row(cell, gx + row * gx_cols, gh + b * GH if gh != NULL else NULL,
                         h + b * H, NULL if c == NULL else c + b * H, out_row, acts_row, H,
                         opts, peep)
            elif cell == LSTM:
                lstm_row(gx + row * gx_cols, h + b * H, c + b * H, out_row, acts_row, H, H)
            elif cell == GRU:
                gru_row(gx + row * gx_cols, gh + b * GH, h + b * H, h + b * H, out_row,
                        acts_row, H, H)
            elif cell == GRU_RESET_BEFORE:
                gru_reset_row(gx + row * gx_cols, h + b * H, out_row, acts_row, H)
            else:
                rnn_row(gx + row * gx_cols, h + b * H, out_row, acts_row, H,
                        cell == RNN_RELU)
            if zone != NULL:
                if h_prev != NULL:
                    h_old = h_prev + row * h_cols
                    c_old = NULL if c_prev == NULL else c_prev + row * h_cols
                else:
                    h_old = <floating*>zone.keep + 2 * b * H
                    c_old = <floating*>zone.keep + (2 * b + 1) * H
                _zone_row(h + b * H, out_row, h_old,
                          NULL if zone.mask_h == NULL else <const floating*>zone.mask_h
                          + row * h_cols, zone.rate_h, H)
                if c != NULL:
                    _zone_row(c + b * H, NULL, c_old,
                              NULL if zone.mask_c == NULL else <const floating*>zone.mask_c
                              + row * h_cols, zone.rate_c, H)


cdef inline void _zone_row(floating* state, floating* out, const floating* old,
                           const floating* mask, double rate, Py_ssize_t H) noexcept nogil:
    """Zoneout of one row's new state: in training each unit whose mask is 1
    keeps its old value; in inference (mask NULL) the expectation,
    rate * old + (1 - rate) * new. out (or NULL) gets the result too."""
    cdef Py_ssize_t j
    cdef floating v, keep = <floating>rate
    if rate == 0:
        return
    for j in range(H):
        if mask != NULL:
            v = old[j] if mask[j] != 0 else state[j]
        else:
            v = keep * old[j] + (<floating>1 - keep) * state[j]
        state[j] = v
        if out != NULL:
            out[j] = v


cdef struct ProjectJob:
    bint is_double
    const void* x
    const void* w_ih
    const void* bias
    void* gx
    Py_ssize_t D, N, max_rows
    Py_ssize_t rows[MAX_PARTS][2]   # per part: first row, end
    Interrupt interrupt
    bint has_packed
    Packed packed[2]            # float32: W_ih packed per direction


cdef void _project_job(void* arg, int part) noexcept nogil:
    cdef ProjectJob* j = <ProjectJob*>arg
    cdef Py_ssize_t r0 = j.rows[part][0], r1 = j.rows[part][1]
    cdef unsigned int fpenv
    if r1 <= r0:
        return
    fpenv = fastrnn_flush_denormals()
    if j.is_double:
        _project_inputs(<const double*>j.x + r0 * j.D, r1 - r0, j.D, <const double*>j.w_ih,
                        NULL, j.N, <const double*>j.bias, <double*>j.gx + r0 * j.N, j.max_rows,
                        &j.interrupt)
    else:
        _project_inputs(<const float*>j.x + r0 * j.D, r1 - r0, j.D, <const float*>j.w_ih,
                        j.packed if j.has_packed else NULL, j.N, <const float*>j.bias, <float*>j.gx + r0 * j.N, j.max_rows,
                        &j.interrupt)
    fastrnn_restore_fpenv(fpenv)


def project(*, const floating[:, ::1] x not None, const floating[:, ::1] w_ih not None,
            const floating[::1] bias_x, floating[:, ::1] gx not None, Py_ssize_t max_rows,
            parts, packed=None, Py_ssize_t hidden_size=0):
    """gx (R, N) = x (R, D) @ w_ih^T + bias_x: the input projection of every
    step, batch row and direction of a layer (bias_x may be None; GEMMs of at
    most max_rows rows, the BLAS int range). ``parts``: one or two row ranges
    (r0, r1); a second runs at the same time on the worker thread. packed
    (float32): ``pack_projection``'s arrays (with the layer's hidden_size);
    the micro-kernel then runs the product."""
    cdef ProjectJob job
    cdef Py_ssize_t d
    if x.shape[0] == 0:
        return
    job.is_double = floating is double
    job.x = &x[0, 0]
    job.w_ih = &w_ih[0, 0]
    job.bias = NULL if bias_x is None else &bias_x[0]
    job.gx = &gx[0, 0]
    job.D = x.shape[1]
    job.N = w_ih.shape[0]
    job.max_rows = max_rows
    job.has_packed = False
    if floating is float and packed is not None:
        if len(packed) > 2 or hidden_size < 1 or job.N % (len(packed) * hidden_size):
            raise ValueError("project: packed does not fit w_ih")
        for d in range(len(packed)):
            describe_packed(&job.packed[d], packed[d], job.D, hidden_size,
                             job.N // len(packed) // hidden_size)
        job.has_packed = True
    run_parts(_project_job, &job, &job.rows[0][0], 2, parts, &job.interrupt)


# --- weights packed for the micro-kernel (_microkernel.h) ---

MICROKERNEL_ISA = FASTRNN_MK_ISA.decode()
MICROKERNEL_LANES = FASTRNN_MK_LANES


def pack_weights(const float[:, ::1] w not None, Py_ssize_t row0, Py_ssize_t units, int gates):
    """Rows [row0, row0 + gates * units) of w (N, K), ``gates`` blocks of
    ``units`` rows, packed for the micro-kernel as B (K, gates * units):
    a float32 array (64-byte aligned) for ``recur``'s ``packed``."""
    cdef Py_ssize_t K = w.shape[1]
    cdef int ub = unit_blocks_per_group(gates)
    cdef Py_ssize_t size = fastrnn_mk_packed_size(K, units, gates, ub)
    cdef float[::1] out
    if row0 < 0 or units < 1 or gates < 1 or row0 + gates * units > w.shape[0]:
        raise ValueError(f"pack_weights: rows [{row0}, {row0} + {gates} x {units}) do not "
                         f"fit a matrix of {w.shape[0]} rows")
    packed = aligned_float32(size)
    out = packed
    with nogil:
        fastrnn_mk_pack(&w[row0, 0], 1, K, K, units, gates, ub, &out[0])
    return packed


def group_units(int gates):
    """Units of one packed group of a ``gates``-gate matrix: splits of the
    units between threads fall on multiples of it."""
    return FASTRNN_MK_LANES * unit_blocks_per_group(gates)


def pack_recurrent(w_hh, int cell, Py_ssize_t H, Py_ssize_t dirs):
    """A float32 layer's W_hh (dirs * G * H, H) packed per direction for
    ``recur``: one array per direction, or two (the r, z rows and the n
    rows) for the reset-before GRU, whose n product reads r * h."""
    cdef Py_ssize_t G = num_gates(cell)
    cell = base_cell(cell)
    packs = []
    for d in range(dirs):
        if cell == GRU_RESET_BEFORE:
            packs.append(pack_weights(w_hh, d * G * H, H, 2))
            packs.append(pack_weights(w_hh, d * G * H + 2 * H, H, 1))
        else:
            packs.append(pack_weights(w_hh, d * G * H, H, G))
    return packs


cdef int _fill_packed(Packed* out, packs, int cell, Py_ssize_t H, Py_ssize_t dirs) except -1:
    """Packed descriptors (into out, up to 4) of pack_recurrent's arrays."""
    cdef Py_ssize_t i
    cdef Py_ssize_t per_dir
    cell = base_cell(cell)
    per_dir = 2 if cell == GRU_RESET_BEFORE else 1
    if len(packs) != per_dir * dirs:
        raise ValueError(f"expected {per_dir * dirs} packed arrays, got {len(packs)}")
    for i in range(len(packs)):
        describe_packed(&out[i], packs[i], H, H,
                         (2 if i % 2 == 0 else 1) if cell == GRU_RESET_BEFORE
                         else <int>num_gates(cell))
    return 0


def pack_folded(w_ih, w_hh, int cell, Py_ssize_t H, Py_ssize_t dirs):
    """A float32 plain LSTM's [W_ih, W_hh] (rows: dirs * 4 * H; columns: D
    then H) packed per direction for ``recur``'s folded steps."""
    if base_cell(cell) != LSTM:
        raise ValueError("pack_folded: only the LSTM folds its projection")
    w_cat = np.ascontiguousarray(np.concatenate([w_ih, w_hh], axis=1), dtype=np.float32)
    return [pack_weights(w_cat, d * num_gates(cell) * H, H, <int>num_gates(cell))
            for d in range(dirs)]


cdef int _fill_folded(RecurJob* job, int cell, const float[:, ::1] x, folded,
                      const float[::1] bias_x, float[::1] xh, Py_ssize_t rows, options,
                      zoneout, dropout_masks) except -1:
    """The folded call's fields, every size checked (a mismatch is a bug of
    the caller: ValueError, never memory misread)."""
    cdef Py_ssize_t d, H = job.H, G = num_gates(cell)
    if (cell != LSTM or options is not None or zoneout is not None
            or dropout_masks is not None):
        raise ValueError("recur: only a plain LSTM without recurrent dropout folds")
    if (x is None or xh is None or len(folded) != job.dirs or x.shape[0] != rows
            or xh.shape[0] != job.dirs * job.B * (x.shape[1] + H)
            or (bias_x is not None and bias_x.shape[0] != job.dirs * G * H)):
        raise ValueError("recur: the folded call's buffers do not fit the layer")
    for d in range(job.dirs):
        describe_packed(&job.packed[d], folded[d], x.shape[1] + H, H, <int>G)
    job.packs_per_dir = 1
    job.folded = True
    job.x = &x[0, 0]
    job.D = x.shape[1]
    job.bias_x = NULL if bias_x is None else &bias_x[0]
    job.xh = &xh[0]
    return 0


# --- gate options of the *_OPT kinds (_gates.GateOptions) ---

# a direction's options as a row of OPTION_FIELDS floats (_gates.read_options)
OPTION_FIELDS = OPTION_ROW
ACTIVATION_KINDS = {"sigmoid": ACT_SIGMOID, "tanh": ACT_TANH, "relu": ACT_RELU,
                    "affine": ACT_AFFINE, "leaky_relu": ACT_LEAKY_RELU,
                    "thresholded_relu": ACT_THRESHOLDED_RELU, "scaled_tanh": ACT_SCALED_TANH,
                    "hard_sigmoid": ACT_HARD_SIGMOID, "elu": ACT_ELU, "softsign": ACT_SOFTSIGN,
                    "softplus": ACT_SOFTPLUS}


def pack_gates(w_hh, int cell, Py_ssize_t H, Py_ssize_t dirs):
    """A float32 layer's W_hh with each gate block packed alone (dirs x G
    arrays) for ``recur``'s dropout_packs: under Keras' recurrent dropout
    each gate reads its own masked h."""
    cdef Py_ssize_t G = num_gates(cell)
    return [pack_weights(w_hh, (d * G + g) * H, H, 1) for d in range(dirs) for g in range(G)]


def pack_projection(w_ih, int cell, Py_ssize_t H, Py_ssize_t dirs):
    """A float32 layer's W_ih (dirs * G * H, D) packed per direction for
    ``project``."""
    cdef Py_ssize_t G = num_gates(cell)
    return [pack_weights(w_ih, d * G * H, H, <int>G) for d in range(dirs)]



# --- what the machine and the kernel reach (fastrnn bench prints both) ---

def _best_time(run, double seconds):
    """(reps, seconds): ``run(reps)`` timed, reps doubled until a run takes
    seconds / 5, then the best of 5 runs of that many."""
    import time
    reps = 1
    while True:   # calibrate
        start = time.perf_counter()
        run(reps)
        best = time.perf_counter() - start
        if best >= seconds / 5 or reps >= (1 << 40):
            break
        reps *= 2
    for _ in range(4):
        start = time.perf_counter()
        run(reps)
        best = min(best, time.perf_counter() - start)
    return reps, best


def fma_peak_gflops(double seconds=0.25):
    """One thread's float32 fused multiply-add peak, GFLOP/s: the best of 5
    timings of a register-only FMA loop (nothing loaded or stored) of about
    seconds / 5 each. The bound every float32 product here is judged by."""
    cdef float sink = 0

    def run(long long iters):
        nonlocal sink
        with nogil:
            fastrnn_mk_fma_loop(iters, &sink)

    iters, best = _best_time(run, seconds)
    return iters * 2.0 * FASTRNN_MK_PEAK_CHAINS * FASTRNN_MK_LANES / best / 1e9


def product_gflops(Py_ssize_t M, Py_ssize_t K, int gates, Py_ssize_t units,
                   double seconds=0.25):
    """The per-step product kernel alone on one thread, GFLOP/s: C (M,
    gates * units) += A (M, K) @ B with B (K, gates * units) packed as a
    layer's W_hh^T is (the recurrent step of M batch rows; K = units = H),
    the best of 5 timings of repeated products of about seconds / 5 each."""
    cdef Packed p
    if M < 1 or K < 1 or units < 1 or not 1 <= gates <= FASTRNN_MK_MAX_NV:
        raise ValueError(f"product_gflops: expected M, K, units >= 1 and 1 <= gates <= "
                         f"{FASTRNN_MK_MAX_NV}, got M={M}, K={K}, gates={gates}, units={units}")
    rng = np.random.default_rng(0)
    w = rng.uniform(-0.1, 0.1, (gates * units, K)).astype(np.float32)
    packed = pack_weights(w, 0, units, gates)
    describe_packed(&p, packed, K, units, gates)
    cdef float[:, ::1] a = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    cdef float[:, ::1] c = np.zeros((M, gates * units), np.float32)

    def run(Py_ssize_t reps):
        cdef Py_ssize_t r
        with nogil:
            for r in range(reps):
                packed_product(M, &a[0, 0], K, 1, &p, &c[0, 0], gates * units, units,
                               FASTRNN_MK_FROM_C, NULL)

    reps, best = _best_time(run, seconds)
    return reps * 2.0 * M * K * gates * units / best / 1e9

# --- the time loops of a layer, in one or two parts ---

cdef extern from "_portable.h":
    void fastrnn_wait_spin(long long* spins) noexcept nogil
    long long fastrnn_load_acquire_ll(const long long* p) noexcept nogil
    void fastrnn_store_release_ll(long long* p, long long v) noexcept nogil


cdef struct RecurJob:
    # what recur's two parts share (data pointers of the memoryviews'
    # dtype) and each part's directions and batch rows [lo, hi)
    int cell
    bint is_double, train, blas_held
    Py_ssize_t T, B, H, dirs, row_t, row_b
    void* gx
    const void* w_hh
    const void* w_hh_t
    const void* bias_h
    void* h
    void* c
    void* gh
    void* out
    void* acts
    void* h_prev
    void* c_prev
    const int64_t* lengths
    Py_ssize_t ranges[MAX_PARTS][4]   # per part: d_lo, d_hi, b_lo, b_hi
    Interrupt interrupt
    int packs_per_dir           # 0: BLAS products; else Packed entries per direction
    Packed packed[4]
    LayerExtras extras          # options, peepholes, zoneout, recurrent dropout
    # the input projection folded into the step (Fold, _folded_product):
    # packed then holds [W_ih, W_hh] per direction
    bint folded
    const float* x              # the layer input (R, D)
    Py_ssize_t D
    const float* bias_x         # the input projection's bias (dirs * G * H) or NULL
    float* xh                   # (dirs, B, D + H)


cdef void _recur_part(RecurJob* j, int part, floating* gx, const floating* w_hh,
                      const floating* w_hh_t, const floating* bias_h, floating* h,
                      floating* c, floating* gh, floating* out, floating* acts,
                      floating* h_prev, floating* c_prev, const floating* peep) noexcept nogil:
    cdef Py_ssize_t d_lo = j.ranges[part][0], d_hi = j.ranges[part][1]
    cdef Py_ssize_t b_lo = j.ranges[part][2], b_hi = j.ranges[part][3]
    cdef Py_ssize_t H = j.H, dirs = j.dirs, B = j.B
    cdef Py_ssize_t GH = num_gates(j.cell) * H
    cdef Py_ssize_t S = num_saved(j.cell) * H
    cdef Py_ssize_t gx_cols = dirs * GH, h_cols = dirs * H, acts_cols = dirs * S
    cdef Py_ssize_t acts_t = j.row_t * acts_cols if j.train else 0
    cdef Py_ssize_t acts_b = j.row_b * acts_cols if j.train else acts_cols
    cdef Py_ssize_t first = b_lo * j.row_b       # the first row of this batch range
    cdef Py_ssize_t cols, d
    cdef unsigned int fpenv
    cdef Zoneout zone
    cdef RecurrentDropout drop
    cdef Fold fold
    if d_hi <= d_lo or b_hi <= b_lo:
        return
    cols = step_block(b_hi - b_lo, H, GH, j.blas_held)
    fpenv = fastrnn_flush_denormals()   # per thread: the worker sets its own
    for d in range(d_lo, d_hi):
        if j.folded:
            fold.x = j.x + first * j.D
            fold.D = j.D
            fold.bias = NULL if j.bias_x == NULL else j.bias_x + d * GH
            fold.xh = j.xh + (d * B + b_lo) * (j.D + H)
        _run_direction(
            j.cell, d == 1, j.T, b_hi - b_lo, H, dirs, j.row_t, j.row_b,
            gx + first * gx_cols + d * GH, w_hh + d * GH * H, w_hh_t + d * GH,
            NULL if j.packs_per_dir == 0 else &j.packed[d * j.packs_per_dir],
            NULL if bias_h == NULL else bias_h + d * GH,
            h + (d * B + b_lo) * H,
            NULL if c == NULL else c + (d * B + b_lo) * H,
            NULL if gh == NULL else gh + (d * B + b_lo) * GH,
            out + first * h_cols + d * H,
            acts + (first * acts_cols if j.train else b_lo * acts_cols) + d * S,
            acts_t, acts_b,
            NULL if h_prev == NULL else h_prev + first * h_cols + d * H,
            NULL if c_prev == NULL else c_prev + first * h_cols + d * H,
            NULL if j.lengths == NULL else j.lengths + b_lo, cols, &j.interrupt,
            options_part(&j.extras, d),
            NULL if peep == NULL else peep + d * 3 * H,
            zone_part(&zone, &j.extras.zone, d, j.B, b_lo, first * h_cols + d * H, H, gx),
            dropout_part(&drop, &j.extras.drop, d, num_gates(j.cell), j.B, b_lo, H, gx),
            &fold if j.folded else NULL)
    fastrnn_restore_fpenv(fpenv)


cdef void _recur_job(void* arg, int part) noexcept nogil:
    cdef RecurJob* j = <RecurJob*>arg
    if j.is_double:
        _recur_part(j, part, <double*>j.gx, <const double*>j.w_hh, <const double*>j.w_hh_t,
                    <const double*>j.bias_h, <double*>j.h, <double*>j.c, <double*>j.gh,
                    <double*>j.out, <double*>j.acts, <double*>j.h_prev, <double*>j.c_prev,
                    <const double*>j.extras.peep)
    else:
        _recur_part(j, part, <float*>j.gx, <const float*>j.w_hh, <const float*>j.w_hh_t,
                    <const float*>j.bias_h, <float*>j.h, <float*>j.c, <float*>j.gh,
                    <float*>j.out, <float*>j.acts, <float*>j.h_prev, <float*>j.c_prev,
                    <const float*>j.extras.peep)


def recur(*, int cell, Py_ssize_t T, bint batch_first, parts,
          const floating[:, ::1] w_hh not None,
          const floating[:, ::1] w_hh_t not None,
          const floating[::1] bias_h,
          floating[:, :, ::1] h not None,
          floating[:, :, ::1] c,
          floating[:, ::1] gx not None,
          floating[:, ::1] gh,
          floating[:, ::1] out not None,
          const int64_t[::1] lengths,
          floating[:, ::1] acts not None,
          bint train,
          floating[:, ::1] h_prev,
          floating[:, ::1] c_prev,
          bint blas_held,
          packed=None,
          const double[:, ::1] options=None,
          const floating[::1] peepholes=None,
          zoneout=None,
          const floating[:, ::1] zone_mask_h=None,
          const floating[:, ::1] zone_mask_c=None,
          floating[::1] zone_keep=None,
          const floating[:, :, :, ::1] dropout_masks=None,
          floating[::1] dropout_scratch=None,
          dropout_packs=None,
          const float[:, ::1] x=None,
          folded=None,
          const float[::1] bias_x=None,
          float[::1] xh=None):
    """The time loops of one layer, after ``project``, in one or two parts:
    ``parts`` a list of (d_lo, d_hi, b_lo, b_hi), directions and batch rows
    on disjoint memory. A second part runs at the same time on the worker
    thread (_worker.h), or after the first when another call owns it.

    Shapes (R = T * B rows in time-major or batch-first order, dirs
    directions, G gates, N = dirs * G * H; all checked by the caller):
    w_hh (N, H); w_hh_t (H, N) its transpose; bias_h (N,) the GRU's
    recurrent bias or None; h, c (dirs, B, H) the initial state in, the final
    state out (c None unless LSTM); gx (R, N) from ``project``; gh
    (dirs, B * G * H) GRU workspace or None; out (R, dirs * H); lengths (B,)
    or None; acts (R, dirs * S * H) in training, a (B, dirs * S * H) scratch
    in inference. Training saves (None in inference): h_prev, c_prev
    (R, dirs * H). blas_held: the caller holds BLAS at one thread, so a
    batch-1 gemv need not be cut into single-thread blocks. packed (float32
    only): ``pack_recurrent``'s arrays for each direction, the per-step
    products then run on the micro-kernel; None: through BLAS. options
    (dirs, OPTION_FIELDS), the *_OPT kinds only: one row per direction;
    peepholes (dirs * 3 * H,) the LSTM_OPT's peephole weights or None.
    zoneout: None or (rate_h, rate_c); in training zone_mask_h, zone_mask_c
    (R, dirs * H) the units that keep their old value (1) or None for a
    rate of 0; zone_keep (dirs * B * 2 * H,) scratch. dropout_masks
    (dirs, G, B, H): training's recurrent dropout, or None; dropout_scratch
    (dirs * B * H,); dropout_packs (float32, or None: BLAS) ``pack_gates``'
    arrays. Folded (float32, the plain LSTM without recurrent dropout, the
    plan's ``fold``): ``project`` not run; x (R, D) the layer input,
    folded ``pack_folded``'s arrays (in place of packed), bias_x the
    projection's bias or None, xh a (dirs * B * (D + H),) scratch; gx then
    receives each step's pre-activations.
    """
    cdef RecurJob job
    cdef Py_ssize_t i
    if T == 0 or h.shape[1] == 0:
        return
    job.folded = False
    job.cell = cell
    job.is_double = floating is double
    job.train = train
    job.blas_held = blas_held
    job.T = T
    job.B = h.shape[1]
    job.H = h.shape[2]
    job.dirs = h.shape[0]
    job.row_t = 1 if batch_first else job.B
    job.row_b = T if batch_first else 1
    job.gx = &gx[0, 0]
    job.w_hh = &w_hh[0, 0]
    job.w_hh_t = &w_hh_t[0, 0]
    job.bias_h = NULL if bias_h is None else &bias_h[0]
    job.h = &h[0, 0, 0]
    job.c = NULL if c is None else &c[0, 0, 0]
    job.gh = NULL if gh is None else &gh[0, 0]
    job.out = &out[0, 0]
    job.acts = &acts[0, 0]
    job.h_prev = NULL if h_prev is None else &h_prev[0, 0]
    job.c_prev = NULL if c_prev is None else &c_prev[0, 0]
    job.lengths = NULL if lengths is None else &lengths[0]
    job.packs_per_dir = 0
    if floating is float and packed is not None:
        _fill_packed(job.packed, packed, cell, job.H, job.dirs)
        job.packs_per_dir = len(packed) // job.dirs
    if folded is not None:
        if floating is double:
            raise ValueError("recur: only float32 folds")
        _fill_folded(&job, cell, x, folded, bias_x, xh, gx.shape[0], options, zoneout,
                     dropout_masks)
    fill_extras(&job.extras, cell, job.dirs, job.B, job.H, out.shape[0], train, options,
                peepholes, zoneout, zone_mask_h, zone_mask_c, zone_keep, dropout_masks,
                dropout_scratch)
    if floating is float and dropout_packs is not None and job.extras.drop.mask != NULL:
        if len(dropout_packs) != job.dirs * num_gates(cell):
            raise ValueError("recur: dropout_packs do not fit the layer")
        for i in range(len(dropout_packs)):
            describe_packed(&job.extras.drop_packs[i], dropout_packs[i], job.H, job.H, 1)
        job.extras.drop.packs = job.extras.drop_packs
    run_parts(_recur_job, &job, &job.ranges[0][0], 4, parts, &job.interrupt)


# --- batch 1 on two cores: the hidden units split, a barrier per step ---

cdef enum:
    SYNC_SLOT = 16        # long longs per counter: 128 bytes, never a shared cache line

# pauses between yields at a barrier (_tuning.h)
from fastrnn._tuning cimport WAIT_SPINS


cdef long long _step_barrier(long long* slots, int part, long long steps) noexcept nogil:
    """Publish that ``part`` has done ``steps`` steps and wait until the other
    part has too: spinning (a step takes microseconds), with a yield every
    WAIT_SPINS pauses in case the other part waits for this core.
    Returns the number of yields."""
    cdef long long* other = slots + (1 - part) * SYNC_SLOT
    cdef long long spins = 0
    fastrnn_store_release_ll(slots + part * SYNC_SLOT, steps)
    while fastrnn_load_acquire_ll(other) < steps:
        fastrnn_wait_spin(&spins)
    return spins // WAIT_SPINS


cdef void _run_units(int cell, Py_ssize_t T, Py_ssize_t H, Py_ssize_t lo, Py_ssize_t hi,
                     const floating* gx, const floating* w_part, const floating* w_part_t,
                     const Packed* packed,
                     const floating* bias_part, floating* h, floating* c, floating* work,
                     floating* out, long long* sync, int part, long long* waits) noexcept nogil:
    """Batch 1, one direction: hidden units [lo, hi) of every step, while the
    other part does the rest. Step t reads the whole h_{t-1} (h at t = 0,
    then out's row t - 1), so both parts pass a barrier after every step.
    This part's gate rows of W_hh come packed: w_part (G * u, H) and its
    transpose w_part_t (u = hi - lo units; gate k's rows k * u...), so that
    its product is one call on contiguous weights; or, float32, packed: the
    layer's W_hh packed for the micro-kernel, [lo, hi) then whole groups of
    it. work: (2 G + S) * u,
    this part's own gate values and activations. Ends with this part's
    units of h (and c) holding the final state. waits[0] counts the yields
    at the barriers (steps where the other part was not running)."""
    cdef Py_ssize_t G = num_gates(cell)
    cdef Py_ssize_t GH = G * H
    cdef Py_ssize_t u = hi - lo
    cdef Py_ssize_t Gu = G * u
    cdef Py_ssize_t t, k
    cdef const floating* h_prev
    cdef floating* out_row
    cdef floating* g = work                 # the gate pre-activations (GRU: recurrent side)
    cdef floating* g_in = work + Gu         # GRU: the input side
    cdef floating* acts = work + 2 * Gu
    cdef floating* target = g_in if cell != GRU else g
    cdef floating one = 1
    cdef bint use_loop = Gu * H <= AXPY_MAX
    cdef unsigned int fpenv = fastrnn_flush_denormals()
    for t in range(T):
        h_prev = h if t == 0 else out + (t - 1) * H
        out_row = out + t * H
        for k in range(G):
            memcpy(g_in + k * u, gx + t * GH + k * H + lo, u * sizeof(floating))
        if cell == GRU:
            if bias_part != NULL:
                memcpy(g, bias_part, Gu * sizeof(floating))
            else:
                memset(g, 0, Gu * sizeof(floating))
        if floating is float and packed != NULL:
            packed_product_groups(1, h_prev, H, 1, packed, lo // (packed.ub * FASTRNN_MK_LANES),
                                  (hi + packed.ub * FASTRNN_MK_LANES - 1)
                                  // (packed.ub * FASTRNN_MK_LANES),
                                  lo, target, Gu, u, FASTRNN_MK_FROM_C, NULL)
        elif use_loop:
            axpy_product(h_prev, H, w_part_t, Gu, Gu, target)
        else:
            gemv(False, <int>Gu, <int>H, one, w_part, <int>H, h_prev, one, target)
        if cell == LSTM:
            lstm_row(g_in, out_row + lo, c + lo, out_row + lo, acts, u, u)
        elif cell == GRU:
            gru_row(g_in, g, h_prev + lo, out_row + lo, out_row + lo, acts, u, u)
        else:
            rnn_row(g_in, out_row + lo, out_row + lo, acts, u, cell == RNN_RELU)
        waits[0] += _step_barrier(sync, part, t + 1)
    memcpy(h + lo, out + (T - 1) * H + lo, u * sizeof(floating))
    fastrnn_restore_fpenv(fpenv)


cdef struct UnitJob:
    int cell
    bint is_double
    Py_ssize_t T, H
    Py_ssize_t bounds[3]
    const void* gx
    void* h
    void* c
    void* out
    const void* w_part[2]
    const void* w_part_t[2]
    const void* bias_part[2]
    void* work[2]
    long long* sync
    long long waits[2]      # per part: yields at the barriers
    bint has_packed
    Packed packed[4]


cdef void _unit_job(void* arg, int part) noexcept nogil:
    cdef UnitJob* j = <UnitJob*>arg
    if j.is_double:
        _run_units(j.cell, j.T, j.H, j.bounds[part], j.bounds[part + 1],
                   <const double*>j.gx, <const double*>j.w_part[part],
                   <const double*>j.w_part_t[part], NULL, <const double*>j.bias_part[part],
                   <double*>j.h, <double*>j.c, <double*>j.work[part], <double*>j.out,
                   j.sync, part, &j.waits[part])
    else:
        _run_units(j.cell, j.T, j.H, j.bounds[part], j.bounds[part + 1],
                   <const float*>j.gx, <const float*>j.w_part[part],
                   <const float*>j.w_part_t[part],
                   &j.packed[0] if j.has_packed else NULL, <const float*>j.bias_part[part],
                   <float*>j.h, <float*>j.c, <float*>j.work[part], <float*>j.out,
                   j.sync, part, &j.waits[part])


def recur_units(*, int cell, Py_ssize_t T, Py_ssize_t mid,
                const floating[:, ::1] w_part0 not None, const floating[:, ::1] w_part_t0 not None,
                const floating[::1] bias_part0, floating[::1] work0 not None,
                const floating[:, ::1] w_part1 not None, const floating[:, ::1] w_part_t1 not None,
                const floating[::1] bias_part1, floating[::1] work1 not None,
                floating[:, :, ::1] h not None, floating[:, :, ::1] c,
                const floating[:, ::1] gx not None, floating[:, ::1] out not None,
                long long wait_ns, packed=None):
    """Inference of one unidirectional layer at batch 1 with its hidden units
    split: [0, mid) here, [mid, H) on the worker thread at the same time,
    the two passing a barrier after every step. Returns 0, having done
    nothing, when another call owns the worker or it did not take its part
    within wait_ns (then run ``recur``); 1 when done; 2 when done but the
    parts often had to wait for each other (they shared a core).

    h, c (1, 1, H) the state in and out (c None unless LSTM); gx (T, G * H)
    after ``project``; out (T, H); per part (0, 1): w_part (G * u, H) its
    rows of every gate block of W_hh, w_part_t the transpose, bias_part its
    part of the GRU's recurrent bias (or None), work ((2 G + S) * u,). Not
    for the reset-before GRU, whose n product needs all of r * h mid-step.
    packed (float32): the layer's ``pack_recurrent`` arrays, whose groups
    then run the products (mid a multiple of ``group_units``)."""
    cdef UnitJob job
    cdef long long sync_raw[3 * SYNC_SLOT + 16]
    cdef bint claimed
    job.cell = cell
    job.is_double = floating is double
    job.T = T
    job.H = h.shape[2]
    job.bounds[0] = 0
    job.bounds[1] = mid
    job.bounds[2] = job.H
    job.gx = &gx[0, 0]
    job.h = &h[0, 0, 0]
    job.c = NULL if c is None else &c[0, 0, 0]
    job.out = &out[0, 0]
    job.w_part[0] = &w_part0[0, 0]
    job.w_part[1] = &w_part1[0, 0]
    job.w_part_t[0] = &w_part_t0[0, 0]
    job.w_part_t[1] = &w_part_t1[0, 0]
    job.bias_part[0] = NULL if bias_part0 is None else &bias_part0[0]
    job.bias_part[1] = NULL if bias_part1 is None else &bias_part1[0]
    job.work[0] = &work0[0]
    job.work[1] = &work1[0]
    job.has_packed = False
    if floating is float and packed is not None:
        _fill_packed(job.packed, packed, cell, job.H, 1)
        job.has_packed = True
    job.sync = <long long*>((<size_t>sync_raw + 127) & ~(<size_t>127))   # 128-byte aligned
    job.waits[0] = 0
    job.waits[1] = 0
    memset(job.sync, 0, 3 * SYNC_SLOT * sizeof(long long))
    with nogil:
        claimed = run_team(_unit_job, &job, 2, wait_ns)
    if not claimed:
        return 0
    # the parts waited for each other at more than a quarter of the steps:
    # they did not have a core each (another program, or the scheduler)
    return 2 if job.waits[0] + job.waits[1] > T // 4 else 1


def activations(*, const float[::1] x not None, float[::1] sigmoid_out not None, float[::1] tanh_out not None):
    """The float32 sigmoid and tanh exactly as the kernels compute them,
    elementwise over x (for the accuracy tests)."""
    cdef Py_ssize_t j
    with nogil:
        for j in range(x.shape[0]):
            sigmoid_out[j] = sigmoid(x[j])
            tanh_out[j] = tanh_(x[j])


cdef void _limit_part(RecurJob* j, int part, floating* gx, const floating* w_hh,
                      const floating* w_hh_t, floating* h, floating* gh) noexcept nogil:
    cdef Py_ssize_t d_lo = j.ranges[part][0], d_hi = j.ranges[part][1]
    cdef Py_ssize_t b_lo = j.ranges[part][2], b_hi = j.ranges[part][3]
    cdef Py_ssize_t H = j.H, dirs = j.dirs, B = j.B
    cdef Py_ssize_t GH = num_gates(j.cell) * H
    cdef Py_ssize_t first = b_lo * j.row_b
    cdef Py_ssize_t cols = step_block(b_hi - b_lo, H, GH, True)
    cdef Py_ssize_t d, s, t
    if d_hi <= d_lo or b_hi <= b_lo:
        return
    for d in range(d_lo, d_hi):
        for s in range(j.T):
            t = j.T - 1 - s if d == 1 else s
            if floating is float and j.packs_per_dir:
                # the micro-kernel's products (the reset-before GRU's two
                # have the sizes of one over all the gates)
                packed_product(b_hi - b_lo, h + (d * B + b_lo) * H, H, 1,
                               &j.packed[d * j.packs_per_dir],
                               gh + (d * B + b_lo) * GH if gh != NULL else
                               gx + (first + t * j.row_t) * dirs * GH + d * GH,
                               GH if gh != NULL else j.row_b * dirs * GH, H,
                               FASTRNN_MK_FROM_C, NULL)
                if j.packs_per_dir == 2:
                    packed_product(b_hi - b_lo, h + (d * B + b_lo) * H, H, 1,
                                   &j.packed[d * 2 + 1],
                                   gx + (first + t * j.row_t) * dirs * GH + d * GH + 2 * H,
                                   j.row_b * dirs * GH, H, FASTRNN_MK_FROM_C, NULL)
            elif gh != NULL:
                _recurrent_product(b_hi - b_lo, GH, H, h + (d * B + b_lo) * H, H,
                                   w_hh + d * GH * H, w_hh_t + d * GH, dirs * GH,
                                   gh + (d * B + b_lo) * GH, GH, cols)
            else:
                # (the reset-before GRU's two products, r z and n, have the
                # sizes of this one)
                _recurrent_product(b_hi - b_lo, GH, H, h + (d * B + b_lo) * H, H,
                                   w_hh + d * GH * H, w_hh_t + d * GH, dirs * GH,
                                   gx + (first + t * j.row_t) * dirs * GH + d * GH,
                                   j.row_b * dirs * GH, cols)


cdef void _limit_job(void* arg, int part) noexcept nogil:
    cdef RecurJob* j = <RecurJob*>arg
    if j.is_double:
        _limit_part(j, part, <double*>j.gx, <const double*>j.w_hh, <const double*>j.w_hh_t,
                    <double*>j.h, <double*>j.gh)
    else:
        _limit_part(j, part, <float*>j.gx, <const float*>j.w_hh, <const float*>j.w_hh_t,
                    <float*>j.h, <float*>j.gh)


def gemm_limit(*, int cell, Py_ssize_t T, bint batch_first, parts,
               const floating[:, ::1] w_hh not None, const floating[:, ::1] w_hh_t not None,
               floating[:, :, ::1] h not None, floating[:, ::1] gx not None,
               floating[:, ::1] gh, packed=None):
    """The per-step recurrent products of ``recur`` alone, without the gate
    math, in the same parts on the same threads: the benchmark's GEMM-only
    limit. Arguments as recur's of the same names; BLAS held at one thread."""
    cdef RecurJob job
    if T == 0 or h.shape[1] == 0:
        return
    job.cell = cell
    job.is_double = floating is double
    job.T = T
    job.B = h.shape[1]
    job.H = h.shape[2]
    job.dirs = h.shape[0]
    job.row_t = 1 if batch_first else job.B
    job.row_b = T if batch_first else 1
    job.gx = &gx[0, 0]
    job.w_hh = &w_hh[0, 0]
    job.w_hh_t = &w_hh_t[0, 0]
    job.h = &h[0, 0, 0]
    job.gh = NULL if gh is None else &gh[0, 0]
    job.packs_per_dir = 0
    if floating is float and packed is not None:
        _fill_packed(job.packed, packed, cell, job.H, job.dirs)
        job.packs_per_dir = len(packed) // job.dirs
    run_parts(_limit_job, &job, &job.ranges[0][0], 4, parts)


# --- the streaming path: one step of a cell, with as little work as possible ---

cdef void _cell_step(int cell, Py_ssize_t D, Py_ssize_t H, const floating* x,
                     const floating* w_ih_t, const floating* w_hh_t,
                     const floating* bias_x, const floating* bias_h,
                     floating* h, floating* c, floating* work) noexcept nogil:
    """h, c (H,) hold the state in and get the state out; work holds
    G * H (gx) + G * H (gh) + S * H (acts) values."""
    cdef Py_ssize_t GH = num_gates(cell) * H
    cdef floating* gx = work
    cdef floating* gh = work + GH
    cdef floating* acts = work + 2 * GH
    if bias_x != NULL:
        memcpy(gx, bias_x, GH * sizeof(floating))
    else:
        memset(gx, 0, GH * sizeof(floating))
    axpy_product(x, D, w_ih_t, GH, GH, gx)
    if cell == GRU:
        if bias_h != NULL:
            memcpy(gh, bias_h, GH * sizeof(floating))
        else:
            memset(gh, 0, GH * sizeof(floating))
        axpy_product(h, H, w_hh_t, GH, GH, gh)
        gru_row(gx, gh, h, h, h, acts, H, H)
    elif cell == GRU_RESET_BEFORE:
        axpy_product(h, H, w_hh_t, GH, 2 * H, gx)
        gru_reset_gates_row(gx, h, acts, H)
        axpy_product(acts + 3 * H, H, w_hh_t + 2 * H, GH, H, gx + 2 * H)
        gru_reset_row(gx, h, h, acts, H)
    else:
        axpy_product(h, H, w_hh_t, GH, GH, gx)
        if cell == LSTM:
            lstm_row(gx, h, c, h, acts, H, H)
        else:
            rnn_row(gx, h, h, acts, H, cell == RNN_RELU)


cdef inline bint _behaved(cnp.ndarray a, int typenum):
    """a holds values of the given dtype in native byte order, aligned: the
    type number alone does not tell '>f4' from '<f4'."""
    return cnp.PyArray_TYPE(a) == typenum and cnp.PyArray_ISBEHAVED_RO(a)


cdef inline bint _plain(object a, int typenum, Py_ssize_t n):
    """a is a C-contiguous 1-D ndarray of the given dtype (native byte order)
    and length."""
    return (type(a) is cnp.ndarray and _behaved(<cnp.ndarray>a, typenum)
            and cnp.PyArray_NDIM(<cnp.ndarray>a) == 1
            and cnp.PyArray_DIM(<cnp.ndarray>a, 0) == n
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a))


cdef inline bint _plain_rows(object a, int typenum, Py_ssize_t ndim, Py_ssize_t B,
                             Py_ssize_t n):
    """a is a C-contiguous ndarray of the given dtype (native byte order),
    of shape (n,) when ndim is 1, else (B, n)."""
    if (type(a) is not cnp.ndarray or not _behaved(<cnp.ndarray>a, typenum)
            or cnp.PyArray_NDIM(<cnp.ndarray>a) != ndim
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)):
        return False
    if ndim == 1:
        return cnp.PyArray_DIM(<cnp.ndarray>a, 0) == n
    return cnp.PyArray_DIM(<cnp.ndarray>a, 0) == B and cnp.PyArray_DIM(<cnp.ndarray>a, 1) == n


cdef void _cell_rows(int cell, Py_ssize_t B, Py_ssize_t D, Py_ssize_t H, const float* x,
                     const Packed* packed_ih, const Packed* packed_hh,
                     const float* bias_x, const float* bias_h, float* h, float* c,
                     float* work) noexcept nogil:
    """One float32 step of B rows on the micro-kernel, with the layers'
    chains (so the numbers are theirs at T = 1): h, c (B, H) hold the state
    in and get the state out; work: B * (2 G H + S H) values."""
    cdef Py_ssize_t GH = num_gates(cell) * H
    cdef Py_ssize_t S = num_saved(cell) * H
    cdef float* gx = work
    cdef float* gh = work + B * GH
    cdef float* acts = work + 2 * B * GH
    cdef Py_ssize_t b
    packed_product(B, x, D, 1, packed_ih, gx, GH, H,
                   FASTRNN_MK_ZERO if bias_x == NULL else FASTRNN_MK_FROM_ROW, bias_x)
    if cell == GRU:
        packed_product(B, h, H, 1, packed_hh, gh, GH, H,
                       FASTRNN_MK_ZERO if bias_h == NULL else FASTRNN_MK_FROM_ROW, bias_h)
        for b in range(B):
            gru_row(gx + b * GH, gh + b * GH, h + b * H, h + b * H, h + b * H, acts + b * S,
                    H, H)
    elif cell == GRU_RESET_BEFORE:
        packed_product(B, h, H, 1, packed_hh, gx, GH, H, FASTRNN_MK_FROM_C, NULL)
        for b in range(B):
            gru_reset_gates_row(gx + b * GH, h + b * H, acts + b * S, H)
        packed_product(B, acts + 3 * H, S, 1, packed_hh + 1, gx + 2 * H, GH, H,
                       FASTRNN_MK_FROM_C, NULL)
        for b in range(B):
            gru_reset_row(gx + b * GH, h + b * H, h + b * H, acts + b * S, H)
    else:
        packed_product(B, h, H, 1, packed_hh, gx, GH, H, FASTRNN_MK_FROM_C, NULL)
        for b in range(B):
            if cell == LSTM:
                lstm_row(gx + b * GH, h + b * H, c + b * H, h + b * H, acts + b * S, H, H)
            else:
                rnn_row(gx + b * GH, h + b * H, h + b * H, acts + b * S, H, cell == RNN_RELU)


cdef enum:
    # rows up to which a batched cell call takes the streaming path (one
    # thread, no Python-side work): above, the layers' driver may split it
    CELL_STEP_MAX_ROWS = 64


cdef class CellStep:
    """One step of a cell for the common case, from Python in about a
    microsecond: the streaming path of ``RNNCell/GRUCell/LSTMCell.__call__``.

    Built from the cell's parameters (the cell builds a new one when they
    change): float32 cells run the micro-kernel over the packed weights the
    layers use (``pack_projection``, ``pack_recurrent``), so a step gives
    the layers' numbers; float64 cells take one unbatched frame through
    loops over transposed copies. ``step(x, hx)`` returns None unless x is a
    C-contiguous array of the cell's dtype, (D,) or (float32) (B, D) with B
    up to CELL_STEP_MAX_ROWS, and hx None or such arrays of the state's
    shape (a tuple (h, c) for LSTM); the caller then takes the general path,
    which validates and converts.
    """
    cdef int cell, typenum
    cdef Py_ssize_t D, H, GH, S, itemsize
    cdef object keep                           # the arrays we point into
    cdef char* w_ih_t_ptr
    cdef char* w_hh_t_ptr
    cdef char* bias_x_ptr
    cdef char* bias_h_ptr
    cdef bint has_c, packed
    cdef Packed packed_ih
    cdef Packed packed_hh[2]

    def __init__(self, int cell, w_ih, w_hh, bias_x, bias_h, packed_ih=None, packed_hh=None):
        self.cell = cell
        self.typenum = cnp.PyArray_TYPE(<cnp.ndarray>w_ih)
        self.itemsize = cnp.PyArray_ITEMSIZE(<cnp.ndarray>w_ih)
        self.D = w_ih.shape[1]
        self.H = w_hh.shape[1]
        self.GH = w_hh.shape[0]
        self.S = num_saved(cell) * self.H
        self.has_c = cell == LSTM
        bias_x = None if bias_x is None else np.ascontiguousarray(bias_x)
        bias_h = None if bias_h is None else np.ascontiguousarray(bias_h)
        self.bias_x_ptr = NULL if bias_x is None else <char*>cnp.PyArray_DATA(<cnp.ndarray>bias_x)
        self.bias_h_ptr = NULL if bias_h is None else <char*>cnp.PyArray_DATA(<cnp.ndarray>bias_h)
        self.packed = packed_ih is not None and self.typenum == cnp.NPY_FLOAT32
        if self.packed:
            describe_packed(&self.packed_ih, packed_ih[0], self.D, self.H,
                             <int>num_gates(cell))
            _fill_packed(self.packed_hh, packed_hh, cell, self.H, 1)
            self.keep = (bias_x, bias_h, packed_ih, packed_hh)
            self.w_ih_t_ptr = NULL
            self.w_hh_t_ptr = NULL
        else:
            w_ih_t = np.ascontiguousarray(w_ih.T)
            w_hh_t = np.ascontiguousarray(w_hh.T)
            self.keep = (bias_x, bias_h, w_ih_t, w_hh_t)
            self.w_ih_t_ptr = <char*>cnp.PyArray_DATA(<cnp.ndarray>w_ih_t)
            self.w_hh_t_ptr = <char*>cnp.PyArray_DATA(<cnp.ndarray>w_hh_t)

    def step(self, x, hx):
        cdef cnp.npy_intp dims[2]
        cdef cnp.ndarray h_out, c_out = None
        cdef object h_in = None, c_in = None
        cdef char* work
        cdef Py_ssize_t ndim, B
        if type(x) is not cnp.ndarray:
            return None
        ndim = cnp.PyArray_NDIM(<cnp.ndarray>x)
        if ndim == 2 and self.packed:
            B = cnp.PyArray_DIM(<cnp.ndarray>x, 0)
            if B > CELL_STEP_MAX_ROWS or B == 0:
                return None
        elif ndim == 1:
            B = 1
        else:
            return None
        if not _plain_rows(x, self.typenum, ndim, B, self.D):
            return None
        if hx is not None:
            if self.has_c:
                if type(hx) is not tuple or len(<tuple>hx) != 2:
                    return None
                h_in, c_in = (<tuple>hx)[0], (<tuple>hx)[1]
                if not _plain_rows(c_in, self.typenum, ndim, B, self.H):
                    return None
            else:
                h_in = hx
            if not _plain_rows(h_in, self.typenum, ndim, B, self.H):
                return None
        dims[0] = B if ndim == 2 else self.H
        dims[1] = self.H
        # fresh outputs (the caller's state is never written), holding the
        # state in, updated in place by the kernel
        if h_in is None:
            h_out = cnp.PyArray_ZEROS(ndim, dims, self.typenum, 0)
        else:
            h_out = cnp.PyArray_NewCopy(<cnp.ndarray>h_in, cnp.NPY_CORDER)
        if self.has_c:
            if c_in is None:
                c_out = cnp.PyArray_ZEROS(ndim, dims, self.typenum, 0)
            else:
                c_out = cnp.PyArray_NewCopy(<cnp.ndarray>c_in, cnp.NPY_CORDER)
        work = <char*>PyMem_Malloc(B * (2 * self.GH + self.S) * self.itemsize)
        if work == NULL:
            raise MemoryError()
        with nogil:
            if self.packed:
                _cell_rows(self.cell, B, self.D, self.H,
                           <const float*>cnp.PyArray_DATA(<cnp.ndarray>x),
                           &self.packed_ih, self.packed_hh,
                           <float*>self.bias_x_ptr, <float*>self.bias_h_ptr,
                           <float*>cnp.PyArray_DATA(h_out),
                           NULL if c_out is None else <float*>cnp.PyArray_DATA(c_out),
                           <float*>work)
            elif self.typenum == cnp.NPY_FLOAT32:
                _cell_step(self.cell, self.D, self.H,
                           <float*>cnp.PyArray_DATA(<cnp.ndarray>x),
                           <float*>self.w_ih_t_ptr, <float*>self.w_hh_t_ptr,
                           <float*>self.bias_x_ptr, <float*>self.bias_h_ptr,
                           <float*>cnp.PyArray_DATA(h_out),
                           NULL if c_out is None else <float*>cnp.PyArray_DATA(c_out),
                           <float*>work)
            else:
                _cell_step(self.cell, self.D, self.H,
                           <double*>cnp.PyArray_DATA(<cnp.ndarray>x),
                           <double*>self.w_ih_t_ptr, <double*>self.w_hh_t_ptr,
                           <double*>self.bias_x_ptr, <double*>self.bias_h_ptr,
                           <double*>cnp.PyArray_DATA(h_out),
                           NULL if c_out is None else <double*>cnp.PyArray_DATA(c_out),
                           <double*>work)
        PyMem_Free(work)
        return (h_out, c_out) if self.has_c else h_out


# --- the lean path of a layer call: small inference in one Cython call ---

cdef bint _blas_hold_needed(Py_ssize_t rows, Py_ssize_t n_cols, Py_ssize_t in_cols,
                            Py_ssize_t batch, Py_ssize_t gates_h,
                            Py_ssize_t hidden) noexcept nogil:
    """Whether one of a layer call's BLAS calls is large enough for OpenBLAS
    to thread (then the call holds BLAS at one thread; see _parallel)."""
    if rows * n_cols * in_cols > GEMM_ONE_THREAD_MNK:
        return True
    if batch == 1:   # a loop below AXPY_MAX, else gemv
        return gates_h * hidden > max(<Py_ssize_t>AXPY_MAX, <Py_ssize_t>GEMV_ONE_THREAD_MN)
    return batch * gates_h * hidden > GEMM_ONE_THREAD_MNK


def blas_hold_needed(Py_ssize_t rows, Py_ssize_t n_cols, Py_ssize_t in_cols, Py_ssize_t batch,
                     Py_ssize_t gates_h, Py_ssize_t hidden):
    return _blas_hold_needed(rows, n_cols, in_cols, batch, gates_h, hidden)


cdef void _run_small(int cell, Py_ssize_t L, Py_ssize_t dirs, Py_ssize_t T, Py_ssize_t B,
                     Py_ssize_t D, Py_ssize_t H, bint batch_first, const floating* x,
                     const floating** w_ih, const floating** w_hh, const floating** w_hh_t,
                     const floating** bias_x, const floating** bias_h, const Packed* packed,
                     const Packed* packed_ih,
                     floating* h, floating* c, floating* out, floating* work) noexcept nogil:
    """Every layer and direction of an inference call in this thread, with
    the functions and per-step block sizes of the general path (its BLAS
    calls all stay on one thread), so the numbers are the same. h, c
    (L * dirs, B, H) hold the initial state and end as the final one; work:
    see SequenceRunner.run. packed, packed_ih: NULL, or 4 (W_hh, see
    RecurJob.packed) and 2 (W_ih, per direction) Packed per layer."""
    cdef Py_ssize_t GH = num_gates(cell) * H
    cdef Py_ssize_t N = dirs * GH
    cdef Py_ssize_t rows = T * B
    cdef Py_ssize_t row_t = 1 if batch_first else B
    cdef Py_ssize_t row_b = T if batch_first else 1
    cdef Py_ssize_t S = num_saved(cell) * H
    cdef Py_ssize_t cols = step_block(B, H, GH, False)
    cdef floating* gx = work
    cdef floating* gh = gx + rows * N
    cdef floating* acts = gh + dirs * B * GH
    cdef floating* between = acts + B * dirs * S     # two (rows, dirs * H) buffers
    cdef const floating* layer_in = x
    cdef floating* layer_out
    cdef Py_ssize_t k, d, in_cols = D
    for k in range(L):
        layer_out = out if k == L - 1 else between + (k % 2) * rows * dirs * H
        _project_inputs(layer_in, rows, in_cols, w_ih[k],
                        NULL if packed == NULL else packed_ih + 2 * k, N, bias_x[k], gx, rows,
                        NULL)
        for d in range(dirs):
            _run_direction(cell, d == 1, T, B, H, dirs, row_t, row_b, gx + d * GH,
                           w_hh[k] + d * GH * H, w_hh_t[k] + d * GH,
                           NULL if packed == NULL else
                           packed + 4 * k + (2 if cell == GRU_RESET_BEFORE else 1) * d,
                           NULL if bias_h[k] == NULL else bias_h[k] + d * GH,
                           h + (k * dirs + d) * B * H,
                           NULL if c == NULL else c + (k * dirs + d) * B * H,
                           gh + d * B * GH, layer_out + d * H,
                           acts + d * S, 0, dirs * S, NULL, NULL, NULL, cols, NULL, NULL,
                           NULL, NULL, NULL, NULL)
        layer_in = layer_out
        in_cols = dirs * H


cdef inline object _state_copy(object a, int typenum, Py_ssize_t ndim, cnp.npy_intp* dims):
    """A fresh C-contiguous copy of a (a plain ndarray of exactly these
    dtype and dims), or None when a is anything else."""
    cdef Py_ssize_t i
    if (type(a) is not cnp.ndarray or not _behaved(<cnp.ndarray>a, typenum)
            or cnp.PyArray_NDIM(<cnp.ndarray>a) != ndim):
        return None
    for i in range(ndim):
        if cnp.PyArray_DIM(<cnp.ndarray>a, i) != dims[i]:
            return None
    return cnp.PyArray_NewCopy(<cnp.ndarray>a, cnp.NPY_CORDER)


cdef class SequenceRunner:
    """The lean path of ``RNN/GRU/LSTM.__call__``: a small inference call
    (one thread, BLAS calls too small for OpenBLAS to thread) in one Cython
    call, without the general path's per-call Python work (about 15 us).

    Built from the layer's kernel weights (the layer builds a new one when
    they change). ``run(x, hx)`` returns None unless x is a C-contiguous
    ndarray of the layer's dtype and input size, hx None or plain arrays of
    the exact state shape (a tuple (h, c) for LSTM), and the call is small;
    the caller then takes the general path, which validates and converts.
    max_work: the work from which the general path runs in two parts;
    split_steps: the steps from which a batch-1 call splits its hidden units
    between two threads (_parallel.unit_halves).
    """
    cdef int cell, typenum
    cdef Py_ssize_t L, dirs, D, H, S, itemsize
    cdef bint batch_first, has_c
    cdef double max_work
    cdef Py_ssize_t split_steps
    cdef object keep                   # the weight arrays, alive while we point at them
    cdef const void** ptrs             # w_ih, w_hh, w_hh_t, bias_x, bias_h: L each
    cdef Packed* packed                # float32: 4 per layer (pack_recurrent's), or NULL
    cdef Packed* packed_ih             # float32: 2 per layer (pack_projection's), or NULL

    def __cinit__(self):
        self.ptrs = NULL
        self.packed = NULL
        self.packed_ih = NULL

    def __init__(self, int cell, Py_ssize_t dirs, bint batch_first, w_ih, w_hh, kernel_weights,
                 double max_work, Py_ssize_t split_steps, packed=None, packed_ih=None):
        cdef Py_ssize_t k, j
        cdef object arr
        self.cell = cell
        self.L = len(w_ih)
        self.dirs = dirs
        self.batch_first = batch_first
        self.D = w_ih[0].shape[1]
        self.H = w_hh[0].shape[1]
        self.S = num_saved(cell) * self.H
        self.has_c = cell == LSTM
        self.max_work = max_work
        self.split_steps = split_steps
        self.typenum = cnp.PyArray_TYPE(<cnp.ndarray>w_ih[0])
        self.itemsize = cnp.PyArray_ITEMSIZE(<cnp.ndarray>w_ih[0])
        self.ptrs = <const void**>PyMem_Malloc(5 * self.L * sizeof(void*))
        if self.ptrs == NULL:
            raise MemoryError()
        self.keep = []
        for k in range(self.L):
            bias_x, bias_h, w_hh_t = kernel_weights[k]
            for j, arr in enumerate((w_ih[k], w_hh[k], w_hh_t, bias_x, bias_h)):
                if arr is None:
                    self.ptrs[j * self.L + k] = NULL
                    continue
                arr = np.ascontiguousarray(arr)
                self.keep.append(arr)
                self.ptrs[j * self.L + k] = cnp.PyArray_DATA(<cnp.ndarray>arr)
        if packed is not None and self.typenum == cnp.NPY_FLOAT32:
            self.packed = <Packed*>PyMem_Malloc(4 * self.L * sizeof(Packed))
            if self.packed == NULL:
                raise MemoryError()
            self.packed_ih = <Packed*>PyMem_Malloc(2 * self.L * sizeof(Packed))
            if self.packed_ih == NULL:
                raise MemoryError()
            for k in range(self.L):
                self.keep.append(packed[k])
                _fill_packed(self.packed + 4 * k, packed[k], cell, self.H, dirs)
                self.keep.append(packed_ih[k])
                for j in range(dirs):
                    describe_packed(self.packed_ih + 2 * k + j, packed_ih[k][j],
                                     w_ih[k].shape[1], self.H, <int>num_gates(cell))

    def __dealloc__(self):
        PyMem_Free(self.ptrs)
        PyMem_Free(self.packed)
        PyMem_Free(self.packed_ih)

    def run(self, x, hx):
        cdef cnp.ndarray xa, out, h, c = None
        cdef cnp.npy_intp dims[3]
        cdef cnp.npy_intp sdims[3]
        cdef Py_ssize_t T, B, GH, N, rows, in_cols, ndim, work_size
        cdef bint batched, batch_first
        cdef char* work
        cdef object h_in = None, c_in = None
        cdef unsigned int fpenv
        if type(x) is not cnp.ndarray:
            return None
        xa = <cnp.ndarray>x
        ndim = cnp.PyArray_NDIM(xa)
        if (not _behaved(xa, self.typenum) or not cnp.PyArray_IS_C_CONTIGUOUS(xa)
                or (ndim != 2 and ndim != 3) or cnp.PyArray_DIM(xa, ndim - 1) != self.D):
            return None
        batched = ndim == 3
        batch_first = self.batch_first and batched
        if not batched:
            T, B = cnp.PyArray_DIM(xa, 0), 1
        elif batch_first:
            T, B = cnp.PyArray_DIM(xa, 1), cnp.PyArray_DIM(xa, 0)
        else:
            T, B = cnp.PyArray_DIM(xa, 0), cnp.PyArray_DIM(xa, 1)
        GH = num_gates(self.cell) * self.H
        N = self.dirs * GH
        rows = T * B
        # the widest input of a layer: the input projections' inner dimension
        in_cols = self.D if self.L == 1 else max(self.D, self.dirs * self.H)
        # small: the general path would run it in one part, and no BLAS call
        # is large enough for OpenBLAS to thread. (Its results depend on its
        # thread count for some CPU kernels, and another thread's call may be
        # holding it at one thread: a call that let it thread would then give
        # different last bits alone and among others.)
        if (T == 0 or B == 0 or <double>rows * N * (self.H + 20) >= self.max_work
                or (B == 1 and T >= self.split_steps)
                or _blas_hold_needed(rows, N, in_cols, B, GH, self.H)):
            return None
        # the states: fresh arrays holding hx (or zeros)
        sdims[0] = self.L * self.dirs
        sdims[1] = B
        sdims[2] = self.H
        if not batched:
            sdims[1] = self.H
        if hx is not None:
            if self.has_c:
                if type(hx) is not tuple or len(<tuple>hx) != 2:
                    return None
                h_in, c_in = (<tuple>hx)[0], (<tuple>hx)[1]
            else:
                h_in = hx
            h = _state_copy(h_in, self.typenum, 3 if batched else 2, sdims)
            if h is None:
                return None
            if self.has_c:
                c = _state_copy(c_in, self.typenum, 3 if batched else 2, sdims)
                if c is None:
                    return None
        else:
            h = cnp.PyArray_ZEROS(3 if batched else 2, sdims, self.typenum, 0)
            if self.has_c:
                c = cnp.PyArray_ZEROS(3 if batched else 2, sdims, self.typenum, 0)
        if batched:
            dims[0] = cnp.PyArray_DIM(xa, 0)
            dims[1] = cnp.PyArray_DIM(xa, 1)
            dims[2] = self.dirs * self.H
        else:
            dims[0] = T
            dims[1] = self.dirs * self.H
        out = cnp.PyArray_EMPTY(3 if batched else 2, dims, self.typenum, 0)
        # gx (rows, N), gh (dirs, B * GH), acts (B, dirs * S), two layer buffers
        work_size = rows * N + self.dirs * B * GH + B * self.dirs * self.S
        if self.L > 1:
            work_size += 2 * rows * self.dirs * self.H
        work = <char*>PyMem_Malloc(work_size * self.itemsize)
        if work == NULL:
            raise MemoryError()
        with nogil:
            fpenv = fastrnn_flush_denormals()
            if self.typenum == cnp.NPY_FLOAT32:
                _run_small(self.cell, self.L, self.dirs, T, B, self.D, self.H, batch_first,
                           <const float*>cnp.PyArray_DATA(xa),
                           <const float**>self.ptrs, <const float**>self.ptrs + self.L,
                           <const float**>self.ptrs + 2 * self.L,
                           <const float**>self.ptrs + 3 * self.L,
                           <const float**>self.ptrs + 4 * self.L, self.packed,
                           self.packed_ih,
                           <float*>cnp.PyArray_DATA(h),
                           NULL if c is None else <float*>cnp.PyArray_DATA(c),
                           <float*>cnp.PyArray_DATA(out), <float*>work)
            else:
                _run_small(self.cell, self.L, self.dirs, T, B, self.D, self.H, batch_first,
                           <const double*>cnp.PyArray_DATA(xa),
                           <const double**>self.ptrs, <const double**>self.ptrs + self.L,
                           <const double**>self.ptrs + 2 * self.L,
                           <const double**>self.ptrs + 3 * self.L,
                           <const double**>self.ptrs + 4 * self.L, NULL, NULL,
                           <double*>cnp.PyArray_DATA(h),
                           NULL if c is None else <double*>cnp.PyArray_DATA(c),
                           <double*>cnp.PyArray_DATA(out), <double*>work)
            fastrnn_restore_fpenv(fpenv)
        PyMem_Free(work)
        return (out, (h, c)) if self.has_c else (out, h)
