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
from fastrnn._microkernel cimport (Packed, FASTRNN_MK_FROM_C, FASTRNN_MK_ZERO,
                                  FASTRNN_MK_LANES, fastrnn_mk_groups, fastrnn_mk_pack,
                                  fastrnn_mk_packed_size, aligned_float32, k_block,
                                  packed_product, describe_packed)
from fastrnn._worker cimport (Interrupt, MAX_PARTS, interrupted, interrupt_block_rows,
                             run_parts)
from fastrnn._gates cimport (RNN_TANH, GRU, LSTM, GRU_RESET_BEFORE, RNN_OPT, GRU_OPT,
                             GRU_RESET_BEFORE_OPT, LSTM_OPT, base_cell, num_gates, num_saved,
                             axpy_product, GateOptions, Activation, act_value, act_slope,
                             clipped, clip_slope, Zoneout, zone_part, RecurrentDropout,
                             dropout_part, LayerExtras, fill_extras, options_part, AXPY_MAX,
                             OPTION_SCRATCH, ACT_SIGMOID, ACT_TANH, ACT_HARD_SIGMOID,
                             ACT_SOFTSIGN, sigmoid, lstm_back_row,
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


# The *_OPT kinds: the activations recomputed from the saved pre-activations
# (as the forward computed them), their slopes at those inputs.

cdef inline void _values_slopes(const Activation* a, const floating* pre, floating clip,
                                floating* val, floating* slope, Py_ssize_t n) noexcept nogil:
    """val = act(clip(pre)) and slope = its derivative with respect to pre,
    for n values (the values those of the forward's apply_activation). The
    clip first (slope its 0/1 mask), then each kind's loop on its own, so
    that the loops vectorise."""
    cdef Py_ssize_t j
    cdef floating x, y, alpha = <floating>a.alpha, beta = <floating>a.beta
    cdef const floating* src = pre
    for j in range(n):
        x = pre[j]
        slope[j] = 0 if clip > 0 and (x > clip or x < -clip) else 1
    if clip > 0:
        for j in range(n):
            x = pre[j]
            x = clip if x > clip else x
            val[j] = -clip if x < -clip else x
        src = val
    if a.kind == ACT_SIGMOID:
        for j in range(n):
            y = sigmoid(src[j])
            val[j] = y
            slope[j] = y * (1 - y) * slope[j]
    elif a.kind == ACT_TANH:
        for j in range(n):
            y = tanh_(src[j])
            val[j] = y
            slope[j] = (1 - y * y) * slope[j]
    elif a.kind == ACT_HARD_SIGMOID:
        for j in range(n):
            x = alpha * src[j] + beta
            slope[j] = (alpha if 0 < x < 1 else 0) * slope[j]
            x = 0 if x < 0 else x
            val[j] = 1 if x > 1 else x
    elif a.kind == ACT_SOFTSIGN:
        for j in range(n):
            x = src[j]
            y = 1 + (x if x >= 0 else -x)
            val[j] = x / y
            slope[j] = slope[j] / (y * y)
    else:
        for j in range(n):
            x = src[j]
            y = act_value(a, x)
            val[j] = y
            slope[j] = act_slope(a, x, y) * slope[j]


# The *_OPT kinds' rows: activations and slopes recomputed from the saved
# pre-activations into ``scratch`` (OPTION_SCRATCH * H) and the row's dG,
# then the chain rule per unit.

cdef inline void _rnn_opt_back(const floating* acts, floating* dh, floating* dg, Py_ssize_t H,
                               const GateOptions* o, floating* scratch) noexcept nogil:
    cdef Py_ssize_t j
    _values_slopes(&o.cand, acts, <floating>o.clip, scratch, dg, H)
    for j in range(H):
        dg[j] = dh[j] * dg[j]
        dh[j] = 0


cdef inline void _gru_opt_back(const floating* acts, const floating* h_prev, floating* dh,
                               floating* dgx, floating* dgh, Py_ssize_t H,
                               const GateOptions* o, floating* scratch) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating clip = <floating>o.clip
    cdef floating r, z, n, d, dn, dz, dr
    _values_slopes(&o.gate, acts, clip, scratch, dgx, 2 * H)        # r, z
    _values_slopes(&o.cand, acts + 2 * H, clip, scratch + 2 * H, dgx + 2 * H, H)   # n
    for j in range(H):
        r = scratch[j]
        z = scratch[H + j]
        n = scratch[2 * H + j]
        d = dh[j]
        dn = d * (<floating>1 - z) * dgx[2 * H + j]
        dz = d * (h_prev[j] - n) * dgx[H + j]
        dr = dn * acts[3 * H + j] * dgx[j]
        dgx[j] = dr
        dgx[H + j] = dz
        dgx[2 * H + j] = dn
        dgh[j] = dr
        dgh[H + j] = dz
        dgh[2 * H + j] = dn * r
        dh[j] = d * z


cdef inline void _gru_reset_opt_back_zn(const floating* acts, const floating* h_prev,
                                       floating* dh, floating* dg, Py_ssize_t H,
                                       const GateOptions* o, floating* scratch) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating clip = <floating>o.clip
    cdef floating z, n, d
    _values_slopes(&o.gate, acts + H, clip, scratch, dg + H, H)            # z
    _values_slopes(&o.cand, acts + 2 * H, clip, scratch + H, dg + 2 * H, H)   # n
    for j in range(H):
        z = scratch[j]
        n = scratch[H + j]
        d = dh[j]
        dg[j] = 0
        dg[H + j] = d * (h_prev[j] - n) * dg[H + j]
        dg[2 * H + j] = d * (<floating>1 - z) * dg[2 * H + j]
        dh[j] = d * z


cdef inline void _gru_reset_opt_back_r(const floating* acts, const floating* h_prev,
                                      floating* dh, floating* dg, Py_ssize_t H,
                                      const GateOptions* o, floating* scratch) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating drh
    _values_slopes(&o.gate, acts, <floating>o.clip, scratch, scratch + H, H)   # r
    for j in range(H):
        drh = dg[j]
        dg[j] = drh * h_prev[j] * scratch[H + j]
        dh[j] += drh * scratch[j]


cdef inline void _lstm_opt_back(const floating* acts, const floating* c_prev, floating* dh,
                                floating* dc, floating* dg, Py_ssize_t H,
                                const GateOptions* o, const floating* peep,
                                floating* scratch) noexcept nogil:
    """peep: the peephole weights (i, f, o) or NULL; their own gradients are
    sums over rows of dG and the states (the engine's, after the loop).
    scratch: the values of i, f, g, o, act(c_t), then act's slope at c_t;
    dg first holds the gates' slopes."""
    cdef Py_ssize_t j
    cdef floating clip = <floating>o.clip
    cdef floating i, f, u, og, d, d_pre_o, dc_t, di, df, d_pre_i, d_pre_f
    _values_slopes(&o.gate, acts, clip, scratch, dg, H)                        # i
    if o.input_forget:
        for j in range(H):
            scratch[H + j] = <floating>1 - scratch[j]
            dg[H + j] = 0
    else:
        _values_slopes(&o.gate, acts + H, clip, scratch + H, dg + H, H)        # f
    _values_slopes(&o.cand, acts + 2 * H, clip, scratch + 2 * H, dg + 2 * H, H)   # g
    _values_slopes(&o.gate, acts + 3 * H, clip, scratch + 3 * H, dg + 3 * H, H)   # o
    _values_slopes(&o.cell, acts + 4 * H, 0, scratch + 4 * H, scratch + 5 * H, H)
    for j in range(H):
        i = scratch[j]
        f = scratch[H + j]
        u = scratch[2 * H + j]
        og = scratch[3 * H + j]
        d = dh[j]
        d_pre_o = d * scratch[4 * H + j] * dg[3 * H + j]
        dc_t = dc[j] + d * og * scratch[5 * H + j]
        if peep != NULL:
            dc_t = dc_t + d_pre_o * peep[2 * H + j]
        di = dc_t * u
        df = dc_t * c_prev[j]
        if o.input_forget:   # f = 1 - i
            di = di - df
            d_pre_f = 0
        else:
            d_pre_f = df * dg[H + j]
        d_pre_i = di * dg[j]
        dg[2 * H + j] = dc_t * i * dg[2 * H + j]
        dg[j] = d_pre_i
        dg[H + j] = d_pre_f
        dg[3 * H + j] = d_pre_o
        dc_t = dc_t * f
        if peep != NULL:
            dc_t = dc_t + d_pre_i * peep[j] + d_pre_f * peep[H + j]
        dc[j] = dc_t
        dh[j] = 0


cdef inline void _zone_hold(const Zoneout* zone, Py_ssize_t offset, Py_ssize_t b,
                            floating* dh, floating* dc, Py_ssize_t H) noexcept nogil:
    """Before a row's gate backward: the gradient of the units that kept
    their old value is held back (the gate pass gets none of it)."""
    cdef floating* held = <floating*>zone.keep + 2 * b * H
    cdef const floating* mask_h = (NULL if zone.mask_h == NULL
                                   else <const floating*>zone.mask_h + offset)
    cdef const floating* mask_c = (NULL if zone.mask_c == NULL or dc == NULL
                                   else <const floating*>zone.mask_c + offset)
    cdef Py_ssize_t j
    for j in range(H):
        held[j] = 0
        held[H + j] = 0
        if mask_h != NULL and mask_h[j] != 0:
            held[j] = dh[j]
            dh[j] = 0
        if mask_c != NULL and mask_c[j] != 0:
            held[H + j] = dc[j]
            dc[j] = 0


cdef inline void _zone_release(const Zoneout* zone, Py_ssize_t b, floating* dh, floating* dc,
                               Py_ssize_t H) noexcept nogil:
    """After it: the held gradient goes to the state before the step."""
    cdef const floating* held = <const floating*>zone.keep + 2 * b * H
    cdef Py_ssize_t j
    for j in range(H):
        dh[j] += held[j]
        if dc != NULL:
            dc[j] += held[H + j]


cdef void _dropped_grad(Py_ssize_t B, Py_ssize_t gates, Py_ssize_t H, const floating* dg,
                        Py_ssize_t ldg, const floating* w_hh, const RecurrentDropout* drop,
                        floating* dh) noexcept nogil:
    """dh (B, H) += sum over the first ``gates`` gate blocks of (dG_g . W_g)
    * mask_g: the recurrent products under Keras' recurrent dropout."""
    cdef floating* scratch = <floating*>drop.scratch
    cdef const floating* mask
    cdef Py_ssize_t gate, i
    for gate in range(gates):
        if floating is float and drop.packs != NULL:
            packed_product(B, dg + gate * H, ldg, 1, &drop.packs[gate], scratch, H, H,
                           FASTRNN_MK_ZERO, NULL)
        else:
            gemm(False, False, <int>B, <int>H, <int>H, <floating>1, dg + gate * H, <int>ldg,
                 w_hh + gate * H * H, <int>H, <floating>0, scratch, <int>H)
        mask = <const floating*>drop.mask + gate * drop.gate_stride
        for i in range(B * H):
            dh[i] += scratch[i] * mask[i]


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
                          const int64_t* lengths, Py_ssize_t cols,
                          const Packed* packed, Interrupt* interrupt,
                          const GateOptions* opts, const floating* peep,
                          const Zoneout* zone, const RecurrentDropout* drop,
                          floating* opt_scratch) noexcept nogil:
    """One direction, steps in the reverse of the forward order; pointers are
    offset to this direction's column block. Leaves early, its outputs
    partial, when the call is interrupted. packed (float32): this
    direction's W_hh packed for dG . W_hh (``pack_backward``; the
    reset-before GRU's n rows, then its r, z rows), or NULL for BLAS.
    opts, peep: the *_OPT kinds' options and peephole weights (else NULL).
    zone: this direction's zoneout (_forward.recur's) or NULL: a unit that
    kept its old value passes its gradient straight to the step before.
    drop: its recurrent dropout (_forward.recur's) or NULL. opt_scratch:
    OPTION_SCRATCH * H values for the *_OPT kinds' rows (else NULL)."""
    cdef int kind = base_cell(cell)
    cdef Py_ssize_t GH = num_gates(cell) * H
    cdef Py_ssize_t g_cols = dirs * GH
    cdef Py_ssize_t h_cols = dirs * H
    cdef Py_ssize_t a_cols = dirs * num_saved(cell) * H
    cdef Py_ssize_t s, t, b, j, row
    cdef floating* dh_b
    cdef const floating* dout_row
    for s in range(T):
        if interrupted(interrupt):
            return
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
            if zone != NULL:
                _zone_hold(zone, row * h_cols, b, dh_b, NULL if dc == NULL else dc + b * H, H)
            if cell == LSTM_OPT:
                _lstm_opt_back(acts + row * a_cols, c_prev + row * h_cols, dh_b, dc + b * H,
                               dgx + row * g_cols, H, opts, peep, opt_scratch)
            elif cell == GRU_OPT:
                _gru_opt_back(acts + row * a_cols, h_prev + row * h_cols, dh_b,
                              dgx + row * g_cols, dgh + row * g_cols, H, opts, opt_scratch)
            elif cell == GRU_RESET_BEFORE_OPT:
                _gru_reset_opt_back_zn(acts + row * a_cols, h_prev + row * h_cols, dh_b,
                                       dgx + row * g_cols, H, opts, opt_scratch)
            elif cell == RNN_OPT:
                _rnn_opt_back(acts + row * a_cols, dh_b, dgx + row * g_cols, H, opts,
                              opt_scratch)
            elif cell == LSTM:
                lstm_back_row(acts + row * a_cols, c_prev + row * h_cols, dh_b, dc + b * H,
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
            if zone != NULL:
                _zone_release(zone, b, dh_b, NULL if dc == NULL else dc + b * H, H)
        if kind == GRU_RESET_BEFORE:
            # d(r * h) = dG_n W_hn into dG_r's columns, then dG_r itself
            # (under recurrent dropout d(r * h * mask_n), times mask_n)
            if floating is float and packed != NULL:
                packed_product(B, dgx + t * row_t * g_cols + 2 * H, row_b * g_cols, 1, packed,
                               dgx + t * row_t * g_cols, row_b * g_cols, H,
                               FASTRNN_MK_FROM_C, NULL)
            else:
                _recurrent_grad(B, H, H, dgx + t * row_t * g_cols + 2 * H, row_b * g_cols,
                                w_hh + 2 * H * H, dgx + t * row_t * g_cols, row_b * g_cols,
                                cols)
            for b in range(B):
                if lengths != NULL and t >= lengths[b]:
                    continue
                row = t * row_t + b * row_b
                if drop != NULL:
                    for j in range(H):
                        dgx[row * g_cols + j] *= (<const floating*>drop.mask)[
                            2 * drop.gate_stride + b * H + j]
                if opts != NULL:
                    _gru_reset_opt_back_r(acts + row * a_cols, h_prev + row * h_cols,
                                          dh + b * H, dgx + row * g_cols, H, opts, opt_scratch)
                else:
                    _gru_reset_back_r(acts + row * a_cols, h_prev + row * h_cols, dh + b * H,
                                      dgx + row * g_cols, H)
            if drop != NULL:
                _dropped_grad(B, 2, H, dgx + t * row_t * g_cols, row_b * g_cols, w_hh, drop, dh)
            elif floating is float and packed != NULL:
                packed_product(B, dgx + t * row_t * g_cols, row_b * g_cols, 1, packed + 1, dh,
                               H, H, FASTRNN_MK_FROM_C, NULL)
            else:
                _recurrent_grad(B, 2 * H, H, dgx + t * row_t * g_cols, row_b * g_cols, w_hh,
                                dh, H, cols)
        else:
            if drop != NULL:
                _dropped_grad(B, num_gates(cell), H, dgh + t * row_t * g_cols, row_b * g_cols,
                              w_hh, drop, dh)
            elif floating is float and packed != NULL:
                packed_product(B, dgh + t * row_t * g_cols, row_b * g_cols, 1, packed, dh, H, H,
                               FASTRNN_MK_FROM_C, NULL)
            else:
                _recurrent_grad(B, GH, H, dgh + t * row_t * g_cols, row_b * g_cols, w_hh, dh,
                                H, cols)


# exported: the engine allocates the *_OPT kinds' scratch
OPTION_SCRATCH_UNITS = OPTION_SCRATCH


# --- weights packed for the micro-kernel: products dG . W (K the gate columns) ---

def pack_rows(const float[:, :] w not None, Py_ssize_t row0, Py_ssize_t rows,
              Py_ssize_t col0=0, Py_ssize_t cols=-1):
    """Rows [row0, row0 + rows) and columns [col0, col0 + cols) (all by
    default) of w (N, C; rows any stride apart, columns adjacent) packed for
    the micro-kernel as B (K = rows, cols columns): for products dG . W and
    the sums over rows of the weight gradients; float32, 64-byte aligned."""
    cdef Py_ssize_t C = w.shape[1] - col0 if cols < 0 else cols
    cdef Py_ssize_t size = fastrnn_mk_packed_size(rows, C, 1, 4)
    cdef Py_ssize_t ld = w.strides[0] // sizeof(float)
    cdef float[::1] out
    if (row0 < 0 or rows < 1 or row0 + rows > w.shape[0] or col0 < 0 or C < 1
            or col0 + C > w.shape[1] or w.strides[1] != sizeof(float)
            or w.strides[0] % sizeof(float)):
        raise ValueError(f"pack_rows: rows [{row0}, {row0 + rows}) and columns [{col0}, "
                         f"{col0 + C}) do not fit a matrix of shape ({w.shape[0]}, {w.shape[1]})")
    packed = aligned_float32(size)
    out = packed
    with nogil:
        fastrnn_mk_pack(&w[row0, col0], ld, 1, rows, C, 1, 4, &out[0])
    return packed


def pack_gate_rows(w_hh, int cell, Py_ssize_t H, Py_ssize_t dirs):
    """A float32 layer's W_hh, each gate block's rows packed alone (dirs x G
    arrays) for ``backward_layer``'s dropout_packs (dG_g . W_g per gate under
    Keras' recurrent dropout)."""
    cdef Py_ssize_t G = num_gates(cell)
    return [pack_rows(w_hh, (d * G + g) * H, H) for d in range(dirs) for g in range(G)]


def pack_backward(w_hh, int cell, Py_ssize_t H, Py_ssize_t dirs):
    """A float32 layer's W_hh packed per direction for ``backward_layer``'s
    dG . W_hh: one array per direction, or for the reset-before GRU two,
    its n rows (for d(r * h)) and its r, z rows."""
    cdef Py_ssize_t G = num_gates(cell)
    packs = []
    for d in range(dirs):
        if base_cell(cell) == GRU_RESET_BEFORE:
            packs.append(pack_rows(w_hh, d * G * H + 2 * H, H))
            packs.append(pack_rows(w_hh, d * G * H, 2 * H))
        else:
            packs.append(pack_rows(w_hh, d * G * H, G * H))
    return packs


cdef struct BackJob:
    # what backward_layer's two parts share and each part's ranges
    int cell
    bint is_double
    Py_ssize_t T, B, H, dirs, row_t, row_b, cols_held
    const void* acts
    const void* h_prev
    const void* c_prev
    const void* w_hh
    const void* dout
    void* dh
    void* dc
    void* dgx
    void* dgh
    const int64_t* lengths
    bint blas_held
    Py_ssize_t ranges[MAX_PARTS][4]   # per part: d_lo, d_hi, b_lo, b_hi
    Interrupt interrupt
    int packs_per_dir           # 0: BLAS; else Packed entries per direction
    Packed packed[4]
    LayerExtras extras          # options, peepholes, zoneout, recurrent dropout


cdef void _back_part(BackJob* j, int part, const floating* acts, const floating* h_prev,
                     const floating* c_prev, const floating* w_hh, const floating* dout,
                     floating* dh, floating* dc, floating* dgx, floating* dgh,
                     const floating* peep) noexcept nogil:
    cdef Py_ssize_t d_lo = j.ranges[part][0], d_hi = j.ranges[part][1]
    cdef Py_ssize_t b_lo = j.ranges[part][2], b_hi = j.ranges[part][3]
    cdef Py_ssize_t H = j.H, dirs = j.dirs, B = j.B
    cdef Py_ssize_t GH = num_gates(j.cell) * H
    cdef Py_ssize_t S = num_saved(j.cell) * H
    cdef Py_ssize_t first = b_lo * j.row_b    # the first row of this batch range
    cdef Py_ssize_t g_cols = dirs * GH, h_cols = dirs * H
    cdef Py_ssize_t cols, d
    cdef unsigned int fpenv
    cdef Zoneout zone
    cdef RecurrentDropout drop
    if d_hi <= d_lo or b_hi <= b_lo:
        return
    cols = step_block(b_hi - b_lo, H, GH, j.blas_held)
    fpenv = fastrnn_flush_denormals()    # per thread: the worker sets its own
    for d in range(d_lo, d_hi):
        _back_direction(
            j.cell, d == 1, j.T, b_hi - b_lo, H, dirs, j.row_t, j.row_b,
            acts + first * dirs * S + d * S,
            h_prev + first * h_cols + d * H,
            NULL if c_prev == NULL else c_prev + first * h_cols + d * H,
            w_hh + d * GH * H, dout + first * h_cols + d * H,
            dh + (d * B + b_lo) * H,
            NULL if dc == NULL else dc + (d * B + b_lo) * H,
            dgx + first * g_cols + d * GH, dgh + first * g_cols + d * GH,
            NULL if j.lengths == NULL else j.lengths + b_lo, cols,
            NULL if j.packs_per_dir == 0 else &j.packed[d * j.packs_per_dir], &j.interrupt,
            options_part(&j.extras, d),
            NULL if peep == NULL else peep + d * 3 * H,
            zone_part(&zone, &j.extras.zone, d, B, b_lo, first * h_cols + d * H, H, dh),
            dropout_part(&drop, &j.extras.drop, d, num_gates(j.cell), B, b_lo, H, dh),
            NULL if j.extras.opt_scratch == NULL else
            <floating*>j.extras.opt_scratch + (part * dirs + d) * OPTION_SCRATCH * H)
    fastrnn_restore_fpenv(fpenv)


cdef void _back_job(void* arg, int part) noexcept nogil:
    cdef BackJob* j = <BackJob*>arg
    if j.is_double:
        _back_part(j, part, <const double*>j.acts, <const double*>j.h_prev,
                   <const double*>j.c_prev, <const double*>j.w_hh, <const double*>j.dout,
                   <double*>j.dh, <double*>j.dc, <double*>j.dgx, <double*>j.dgh,
                   <const double*>j.extras.peep)
    else:
        _back_part(j, part, <const float*>j.acts, <const float*>j.h_prev,
                   <const float*>j.c_prev, <const float*>j.w_hh, <const float*>j.dout,
                   <float*>j.dh, <float*>j.dc, <float*>j.dgx, <float*>j.dgh,
                   <const float*>j.extras.peep)


def backward_layer(*, int cell, Py_ssize_t T, bint batch_first, parts,
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
                   floating[::1] option_scratch=None,
                   dropout_packs=None):
    """The BPTT time loops of one layer in one or two parts: ``parts`` a
    list of (d_lo, d_hi, b_lo, b_hi) on disjoint memory; a second part runs
    at the same time on the worker thread (or after the first).

    acts, h_prev, c_prev: the forward's saves; w_hh (dirs * G * H, H);
    dout (R, dirs * H) the gradient of the layer's output; dh, dc (dirs, B, H)
    the gradient of the final state in, of the initial state out (dc None
    unless LSTM); dgx (R, dirs * G * H) pre-activation gradients out (zero on
    padded steps); dgh the same for the recurrent side (GRU) or None.
    blas_held: the caller holds BLAS at one thread (see _forward.recur).
    packed (float32): ``pack_backward``'s arrays per direction; the per-step
    products then run on the micro-kernel. options, peepholes: the *_OPT
    kinds'; zoneout and its masks, the recurrent dropout's masks those of the
    forward, zone_keep and dropout_scratch scratch (see _forward.recur);
    option_scratch (len(parts) * dirs * OPTION_SCRATCH * H,) the *_OPT kinds';
    dropout_packs (float32, or None: BLAS) ``pack_gate_rows``' arrays.
    """
    cdef BackJob job
    cdef Py_ssize_t i
    if T == 0 or dh.shape[1] == 0:
        return
    job.cell = cell
    job.is_double = floating is double
    job.T = T
    job.B = dh.shape[1]
    job.H = dh.shape[2]
    job.dirs = dh.shape[0]
    job.row_t = 1 if batch_first else job.B
    job.row_b = T if batch_first else 1
    job.acts = &acts[0, 0]
    job.h_prev = &h_prev[0, 0]
    job.c_prev = NULL if c_prev is None else &c_prev[0, 0]
    job.w_hh = &w_hh[0, 0]
    job.dout = &dout[0, 0]
    job.dh = &dh[0, 0, 0]
    job.dc = NULL if dc is None else &dc[0, 0, 0]
    job.dgx = &dgx[0, 0]
    job.dgh = &dgx[0, 0] if dgh is None else &dgh[0, 0]
    job.lengths = NULL if lengths is None else &lengths[0]
    job.blas_held = blas_held
    fill_extras(&job.extras, cell, job.dirs, job.B, job.H, dout.shape[0], True, options,
                peepholes, zoneout, zone_mask_h, zone_mask_c, zone_keep, dropout_masks,
                dropout_scratch)
    job.extras.opt_scratch = NULL
    if job.extras.has_options:
        if option_scratch is None or option_scratch.shape[0] < (
                len(parts) * job.dirs * OPTION_SCRATCH * job.H):
            raise ValueError("backward_layer: the gate options need an option_scratch of "
                             f"{len(parts) * job.dirs * OPTION_SCRATCH * job.H} values")
        job.extras.opt_scratch = &option_scratch[0]
    if floating is float and dropout_packs is not None and job.extras.drop.mask != NULL:
        if len(dropout_packs) != job.dirs * num_gates(cell):
            raise ValueError("backward_layer: dropout_packs do not fit the layer")
        for i in range(len(dropout_packs)):
            describe_packed(&job.extras.drop_packs[i], dropout_packs[i], job.H, job.H, 1)
        job.extras.drop.packs = job.extras.drop_packs
    job.packs_per_dir = 0
    if floating is float and packed is not None:
        job.packs_per_dir = 2 if base_cell(cell) == GRU_RESET_BEFORE else 1
        if len(packed) != job.packs_per_dir * job.dirs:
            raise ValueError("backward_layer: packed does not fit the layer")
        for i in range(len(packed)):
            # K: the reset-before GRU's n rows (H), its r, z rows (2 H); else all G H
            describe_packed(&job.packed[i], packed[i],
                            (job.H if i % 2 == 0 else 2 * job.H)
                            if base_cell(cell) == GRU_RESET_BEFORE
                            else num_gates(cell) * job.H, job.H, 1)
    run_parts(_back_job, &job, &job.ranges[0][0], 4, parts, &job.interrupt)


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


cdef struct WeightJob:
    bint is_double
    Py_ssize_t R, D, N, H, dirs, max_rows, ld_rh
    const void* x
    const void* h_prev
    const void* rh          # reset-before GRU: r * h in the saved acts, else NULL
    const void* dgx
    const void* dgh
    void* dw_ih
    void* dw_hh
    void* db_ih
    void* db_hh
    bint separate_dgh       # dgh is its own buffer (GRU), not dgx
    Py_ssize_t cols[MAX_PARTS][2]   # per part: gate columns [n_lo, n_hi)
    Interrupt interrupt
    bint has_packed         # float32: the sums over rows on the micro-kernel
    Packed packed_x         # x packed (pack_rows), K = R
    Packed packed_h[2]      # per direction h_prev's columns packed, K = R
    Packed packed_rh[2]     # reset-before GRU: per direction r * h packed


cdef void _weight_part(WeightJob* j, int part, const floating* x, const floating* h_prev,
                       const floating* rh, const floating* dgx, const floating* dgh,
                       floating* dw_ih, floating* dw_hh, floating* db_ih,
                       floating* db_hh) noexcept nogil:
    cdef Py_ssize_t n_lo = j.cols[part][0], n_hi = j.cols[part][1]
    cdef Py_ssize_t R = j.R, D = j.D, N = j.N, H = j.H, dirs = j.dirs
    cdef Py_ssize_t GH = N // dirs
    cdef Py_ssize_t d, start, n, lo, hi, n_gate
    cdef floating one = 1
    # blocks of the sum over rows, the same for every part (one row: a
    # multiply-add per weight)
    cdef Py_ssize_t block = interrupt_block_rows(N * (D + H), j.max_rows)
    if R == 0 or n_hi <= n_lo:
        return
    start = 0
    while start < R:
        if interrupted(&j.interrupt, True):
            return
        n = min(block, R - start)
        gemm(True, False, <int>(n_hi - n_lo), <int>D, <int>n, one,
             dgx + start * N + n_lo, <int>N, x + start * D, <int>D,
             one, dw_ih + n_lo * D, <int>D)
        for d in range(dirs):
            # the part of [n_lo, n_hi) in direction d's block [d GH, (d + 1) GH)
            lo = max(n_lo, d * GH)
            hi = min(n_hi, (d + 1) * GH)
            # reset before: W_hn's rows [n_gate, (d + 1) GH) multiply r * h
            n_gate = hi if rh == NULL else max(lo, min(hi, d * GH + 2 * H))
            if n_gate > lo:
                gemm(True, False, <int>(n_gate - lo), <int>H, <int>n, one,
                     dgh + start * N + lo, <int>N,
                     h_prev + start * dirs * H + d * H, <int>(dirs * H),
                     one, dw_hh + lo * H, <int>H)
            if hi > n_gate:
                gemm(True, False, <int>(hi - n_gate), <int>H, <int>n, one,
                     dgh + start * N + n_gate, <int>N,
                     rh + start * j.ld_rh + d * (j.ld_rh // dirs), <int>j.ld_rh,
                     one, dw_hh + n_gate * H, <int>H)
        start += n
    if db_ih != NULL and db_hh != NULL:
        if not j.separate_dgh:  # b_hh's gradient is b_ih's: one pass for both
            _column_sums(dgx + n_lo, R, n_hi - n_lo, N, db_ih + n_lo, db_hh + n_lo)
        else:
            _column_sums(dgx + n_lo, R, n_hi - n_lo, N, db_ih + n_lo, NULL)
            _column_sums(dgh + n_lo, R, n_hi - n_lo, N, db_hh + n_lo, NULL)


# rows of one block of the weight gradients' sums over rows (_tuning.h)
from fastrnn._tuning cimport WEIGHT_BLOCK_ROWS


cdef void _weight_part_packed(WeightJob* j, int part, const float* dgx, const float* dgh,
                              float* dw_ih, float* dw_hh, float* db_ih,
                              float* db_hh) noexcept nogil:
    """_weight_part on the micro-kernel: dW[n, :] += sum over rows r, in
    order, of dG[r, n] * act[r, :], in blocks of rows continuing each
    element's chain, so the sums do not depend on how the gate columns are
    split between threads."""
    cdef Py_ssize_t n_lo = j.cols[part][0], n_hi = j.cols[part][1]
    cdef Py_ssize_t R = j.R, D = j.D, N = j.N, H = j.H, dirs = j.dirs
    cdef Py_ssize_t GH = N // dirs
    cdef Py_ssize_t d, r0, r1, lo, hi, n_gate
    cdef Packed blk
    if R == 0 or n_hi <= n_lo:
        return
    r0 = 0
    while r0 < R:
        if interrupted(&j.interrupt, True):
            return
        r1 = min(R, r0 + WEIGHT_BLOCK_ROWS)
        blk = k_block(&j.packed_x, r0, r1)
        packed_product(n_hi - n_lo, dgx + r0 * N + n_lo, 1, N, &blk, dw_ih + n_lo * D, D, D,
                       FASTRNN_MK_FROM_C, NULL)
        for d in range(dirs):
            lo = max(n_lo, d * GH)
            hi = min(n_hi, (d + 1) * GH)
            # reset before: W_hn's rows [n_gate, (d + 1) GH) multiply r * h
            n_gate = hi if not j.rh else max(lo, min(hi, d * GH + 2 * H))
            if n_gate > lo:
                blk = k_block(&j.packed_h[d], r0, r1)
                packed_product(n_gate - lo, dgh + r0 * N + lo, 1, N, &blk, dw_hh + lo * H, H,
                               H, FASTRNN_MK_FROM_C, NULL)
            if hi > n_gate:
                blk = k_block(&j.packed_rh[d], r0, r1)
                packed_product(hi - n_gate, dgh + r0 * N + n_gate, 1, N, &blk,
                               dw_hh + n_gate * H, H, H, FASTRNN_MK_FROM_C, NULL)
        r0 = r1
    if db_ih != NULL and db_hh != NULL:
        if not j.separate_dgh:
            _column_sums(dgx + n_lo, R, n_hi - n_lo, N, db_ih + n_lo, db_hh + n_lo)
        else:
            _column_sums(dgx + n_lo, R, n_hi - n_lo, N, db_ih + n_lo, NULL)
            _column_sums(dgh + n_lo, R, n_hi - n_lo, N, db_hh + n_lo, NULL)


cdef void _weight_job(void* arg, int part) noexcept nogil:
    cdef WeightJob* j = <WeightJob*>arg
    if j.is_double:
        _weight_part(j, part, <const double*>j.x, <const double*>j.h_prev,
                     <const double*>j.rh, <const double*>j.dgx, <const double*>j.dgh,
                     <double*>j.dw_ih, <double*>j.dw_hh, <double*>j.db_ih, <double*>j.db_hh)
    elif j.has_packed:
        _weight_part_packed(j, part, <const float*>j.dgx, <const float*>j.dgh,
                            <float*>j.dw_ih, <float*>j.dw_hh, <float*>j.db_ih,
                            <float*>j.db_hh)
    else:
        _weight_part(j, part, <const float*>j.x, <const float*>j.h_prev,
                     <const float*>j.rh, <const float*>j.dgx, <const float*>j.dgh,
                     <float*>j.dw_ih, <float*>j.dw_hh, <float*>j.db_ih, <float*>j.db_hh)


def weight_grads(*, parts,
                 const floating[:, ::1] x not None,
                 const floating[:, ::1] h_prev not None,
                 const floating[:, ::1] reset_acts,
                 const floating[:, ::1] dgx not None,
                 const floating[:, ::1] dgh,
                 floating[:, ::1] dw_ih not None,
                 floating[:, ::1] dw_hh not None,
                 floating[::1] db_ih,
                 floating[::1] db_hh,
                 Py_ssize_t max_rows,
                 packed=None):
    """Accumulate one layer's weight gradients over all steps: dw_ih += dgx^T
    x; dw_hh (per direction) += dgh^T h_prev; db_ih, db_hh += column sums of
    dgx, dgh (biases None when absent; dgh None means dgx). ``parts``: one or
    two ranges [n_lo, n_hi) of the N = dirs * G * H gate columns (rows of
    dw_ih and dw_hh); a second runs at the same time on the worker thread.
    The reset-before GRU passes its saved acts (R, dirs * 4H) as reset_acts:
    the rows of W_hn then take r * h from them instead of h_prev (None
    otherwise). Sums over more than max_rows rows are chunked (BLAS int range).
    packed (float32): (x, [h_prev per direction], [r * h per direction] or
    None) packed by ``pack_rows``; the micro-kernel then runs the sums."""
    cdef WeightJob job
    cdef Py_ssize_t d
    job.is_double = floating is double
    job.R = x.shape[0]
    job.D = x.shape[1]
    job.N = dgx.shape[1]
    job.H = dw_hh.shape[1]
    job.dirs = h_prev.shape[1] // job.H
    job.max_rows = max_rows
    if job.R == 0:
        return
    job.x = &x[0, 0]
    job.h_prev = &h_prev[0, 0]
    job.rh = NULL if reset_acts is None else &reset_acts[0, 0] + 3 * job.H
    job.ld_rh = 0 if reset_acts is None else reset_acts.shape[1]
    job.dgx = &dgx[0, 0]
    job.dgh = &dgx[0, 0] if dgh is None else &dgh[0, 0]
    job.separate_dgh = dgh is not None
    job.dw_ih = &dw_ih[0, 0]
    job.dw_hh = &dw_hh[0, 0]
    job.db_ih = NULL if db_ih is None else &db_ih[0]
    job.db_hh = NULL if db_hh is None else &db_hh[0]
    job.has_packed = False
    if floating is float and packed is not None:
        packed_x, packed_h, packed_rh = packed
        describe_packed(&job.packed_x, packed_x, job.R, job.D, 1)
        for d in range(job.dirs):
            describe_packed(&job.packed_h[d], packed_h[d], job.R, job.H, 1)
            if packed_rh is not None:
                describe_packed(&job.packed_rh[d], packed_rh[d], job.R, job.H, 1)
        job.has_packed = True
    run_parts(_weight_job, &job, &job.cols[0][0], 2, parts, &job.interrupt)


cdef struct InputJob:
    bint is_double
    const void* dgx
    const void* w_ih
    void* dx
    Py_ssize_t N, D, max_rows
    Py_ssize_t rows[MAX_PARTS][2]
    Interrupt interrupt
    bint has_packed
    Packed packed               # float32: W_ih packed (pack_rows), K = N


cdef void _input_part(InputJob* j, int part, const floating* dgx, const floating* w_ih,
                      floating* dx) noexcept nogil:
    cdef Py_ssize_t start = j.rows[part][0], end = j.rows[part][1], n
    cdef Py_ssize_t N = j.N, D = j.D
    cdef Py_ssize_t block = interrupt_block_rows(N * D, j.max_rows)
    while start < end:
        if interrupted(&j.interrupt, True):
            return
        n = min(block, end - start)
        if floating is float and j.has_packed:
            packed_product(n, dgx + start * N, N, 1, &j.packed, dx + start * D, D, D,
                           FASTRNN_MK_ZERO, NULL)
        else:
            gemm(False, False, <int>n, <int>D, <int>N, <floating>1, dgx + start * N, <int>N,
                 w_ih, <int>D, <floating>0, dx + start * D, <int>D)
        start += n


cdef void _input_job(void* arg, int part) noexcept nogil:
    cdef InputJob* j = <InputJob*>arg
    if j.is_double:
        _input_part(j, part, <const double*>j.dgx, <const double*>j.w_ih, <double*>j.dx)
    else:
        _input_part(j, part, <const float*>j.dgx, <const float*>j.w_ih, <float*>j.dx)


def input_grad(*, const floating[:, ::1] dgx not None, const floating[:, ::1] w_ih not None,
               floating[:, ::1] dx not None, Py_ssize_t max_rows, parts, packed=None):
    """dx (R, D) = dgx (R, N) @ w_ih (N, D), in chunks of <= max_rows rows;
    ``parts``: one or two row ranges, a second on the worker thread. packed
    (float32): ``pack_rows(w_ih, 0, N)``; the micro-kernel then runs it."""
    cdef InputJob job
    if dgx.shape[0] == 0:
        return
    job.is_double = floating is double
    job.dgx = &dgx[0, 0]
    job.w_ih = &w_ih[0, 0]
    job.dx = &dx[0, 0]
    job.N = dgx.shape[1]
    job.D = w_ih.shape[1]
    job.max_rows = max_rows
    job.has_packed = False
    if floating is float and packed is not None:
        describe_packed(&job.packed, packed, job.N, job.D, 1)
        job.has_packed = True
    run_parts(_input_job, &job, &job.rows[0][0], 2, parts, &job.interrupt)
