# Activations and the fused per-row gate arithmetic of every cell, inlined
# into the time loops. Each function updates one batch row of the state in
# place, writes the new h to the output row, and writes the activations
# backward needs to acts: the saves in training, a scratch row in inference.
# acts is never NULL and never aliases the other rows, so that the loops
# have no branch and vectorise. Equations (PyTorch's):
#   RNN:  h' = act(g)                          g = x W_ih^T + b_ih + h W_hh^T + b_hh
#   GRU:  r = s(gx_r + gh_r), z = s(gx_z + gh_z), n = tanh(gx_n + r * gh_n)
#         h' = (1 - z) * n + z * h              gx = x W_ih^T + b_ih, gh = h W_hh^T + b_hh
#   GRU reset before (Keras reset_after=False, ONNX linear_before_reset=0):
#         r, z as above, n = tanh(gx_n + (r * h) W_hn^T + b_hn), h' as above
#   LSTM: i, f, o = s(g_i), s(g_f), s(g_o); u = tanh(g_g)
#         c' = f * c + i * u, h' = o * tanh(c')

from cython cimport floating
from libc.math cimport exp, expm1, expm1f, tanh, log1p, log1pf
from libc.stdint cimport int32_t
from libc.string cimport memcpy

from fastrnn._microkernel cimport Packed

cdef extern from "_fpenv.h":
    unsigned int fastrnn_flush_denormals() noexcept nogil
    void fastrnn_restore_fpenv(unsigned int old) noexcept nogil


# cell kinds, shared by the forward and backward kernels. The *_OPT kinds
# are the same cells with gate options (GateOptions below: activations,
# clip, input_forget, peepholes): the same products, a gate pass that reads
# the options, and the pre-activations saved for backward instead of the
# activations (backward recomputes those; any activation's slope is then a
# function of its input).
cdef enum:
    RNN_TANH = 0
    RNN_RELU = 1
    GRU = 2
    LSTM = 3
    GRU_RESET_BEFORE = 4
    RNN_OPT = 5
    GRU_OPT = 6
    GRU_RESET_BEFORE_OPT = 7
    LSTM_OPT = 8


cdef inline int base_cell(int cell) noexcept nogil:
    """The kind without options, which decides the products and their
    packed weights."""
    if cell == RNN_OPT:
        return RNN_TANH
    if cell == GRU_OPT:
        return GRU
    if cell == GRU_RESET_BEFORE_OPT:
        return GRU_RESET_BEFORE
    if cell == LSTM_OPT:
        return LSTM
    return cell


cdef inline Py_ssize_t num_gates(int cell) noexcept nogil:
    """G: gate blocks of W_ih / W_hh."""
    cell = base_cell(cell)
    if cell == LSTM:
        return 4
    if cell == GRU or cell == GRU_RESET_BEFORE:
        return 3
    return 1


cdef inline Py_ssize_t num_saved(int cell) noexcept nogil:
    """S / H: activations saved per step for backward (the GRU adds W_hn h +
    b_hn, the reset-before GRU r * h; the LSTM with options c_t, which the
    peepholes' gradients need)."""
    if cell == LSTM_OPT:
        return 5
    if cell != RNN_TANH and cell != RNN_RELU and cell != RNN_OPT:
        return 4
    return 1


# float32: branch-free polynomial activations the compiler vectorises (the
# build's -fno-trapping-math lets it turn the clamps into selects). Checked
# over all float32 binades in tests/test_activations.py: sigmoid within 1.5e-7
# absolute (measured 8.9e-8), tanh within 4 ulp relative (measured 2.4);
# NaN in, NaN out; +-inf give the limits. float64: the C library's exp and
# tanh, exact.

cdef inline float _exp_f32(float x) noexcept nogil:
    """e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7
    (truncation < 6e-9 relative), 2^n from the exponent bits. x is clamped to
    [-87, 88] (e^88 is finite in float32); written so that NaN passes."""
    cdef float n, r, p, scale
    cdef int32_t bits
    x = <float>88.0 if x > <float>88.0 else x
    x = <float>-87.0 if x < <float>-87.0 else x
    # round(x / ln2) by the 1.5 * 2^23 trick: float arithmetic only
    n = (x * <float>1.4426950408889634 + <float>12582912.0) - <float>12582912.0
    # ln2 split in a part exact in float32 and the rest (Cody-Waite)
    r = (x - n * <float>0.693145751953125) - n * <float>1.4286067653302e-06
    p = <float>(1.0 / 5040.0)
    p = p * r + <float>(1.0 / 720.0)
    p = p * r + <float>(1.0 / 120.0)
    p = p * r + <float>(1.0 / 24.0)
    p = p * r + <float>(1.0 / 6.0)
    p = p * r + <float>0.5
    p = p * r + <float>1.0
    p = p * r + <float>1.0
    # the int conversion of NaN is undefined: convert 0 instead (p is NaN anyway)
    bits = (<int32_t>(n if n == n else <float>0) + 127) << 23
    memcpy(&scale, &bits, 4)  # compiles to a register move (a union would not vectorise)
    return p * scale


cdef inline floating sigmoid(floating v) noexcept nogil:
    if floating is float:
        return <float>1.0 / (<float>1.0 + _exp_f32(-v))
    else:
        return 1.0 / (1.0 + exp(-v))


cdef inline floating tanh_(floating v) noexcept nogil:
    cdef float a, x2, small, big
    if floating is float:
        # near 0 the odd Taylor series to x^9 (keeps the relative accuracy that
        # 1 - 2 / (e^2|x| + 1) loses to cancellation); elsewhere that formula
        a = v if v >= 0 else -v
        x2 = v * v
        small = v * (<float>1.0 + x2 * (<float>(-1.0 / 3.0) + x2 * (<float>(2.0 / 15.0)
                     + x2 * (<float>(-17.0 / 315.0) + x2 * <float>(62.0 / 2835.0)))))
        big = <float>1.0 - <float>2.0 / (_exp_f32(<float>2.0 * a) + <float>1.0)
        big = -big if v < 0 else big
        return small if a < <float>0.25 else big
    else:
        return tanh(v)


cdef inline floating relu(floating v) noexcept nogil:
    # written so that NaN propagates, as np.maximum(v, 0) does
    return 0 if v < 0 else v


cdef inline void rnn_row(const floating* g, floating* h, floating* out,
                         floating* acts, Py_ssize_t H, bint use_relu) noexcept nogil:
    """acts: h' itself (the derivative of tanh or relu needs only the output)."""
    cdef Py_ssize_t j
    cdef floating v
    for j in range(H):
        v = relu(g[j]) if use_relu else tanh_(g[j])
        h[j] = v
        out[j] = v
        acts[j] = v


cdef inline void gru_row(const floating* gx, const floating* gh, const floating* h_old,
                         floating* h, floating* out, floating* acts, Py_ssize_t units,
                         Py_ssize_t H) noexcept nogil:
    """acts: r, z, n and gh_n = W_hn h + b_hn. ``units`` of the H (the gate
    blocks' stride) from the pointers on; h_old the state before the step
    (may be h itself)."""
    # split in short loops for the reason lstm_activations gives
    cdef Py_ssize_t j
    cdef floating n, v
    for j in range(units):
        acts[j] = sigmoid(gx[j] + gh[j])
    for j in range(units):
        acts[H + j] = sigmoid(gx[H + j] + gh[H + j])
    for j in range(units):
        acts[3 * H + j] = gh[2 * H + j]
        n = tanh_(gx[2 * H + j] + acts[j] * gh[2 * H + j])
        acts[2 * H + j] = n
        v = (<floating>1 - acts[H + j]) * n + acts[H + j] * h_old[j]
        h[j] = v
        out[j] = v


cdef inline void gru_reset_gates_row(const floating* g, const floating* h, floating* acts,
                                     Py_ssize_t H) noexcept nogil:
    """The reset-before GRU's first pass, once g holds x W_ih^T + h W_hr,z^T
    and the biases: acts r, z and r * h (which the n product then reads)."""
    cdef Py_ssize_t j
    cdef floating r
    for j in range(H):
        r = sigmoid(g[j])
        acts[j] = r
        acts[H + j] = sigmoid(g[H + j])
        acts[3 * H + j] = r * h[j]


cdef inline void gru_reset_row(const floating* g, floating* h, floating* out,
                               floating* acts, Py_ssize_t H) noexcept nogil:
    """Its second pass, once g's n block holds gx_n + (r * h) W_hn^T + b_hn:
    acts n; z from the first pass."""
    cdef Py_ssize_t j
    cdef floating z, n, v
    for j in range(H):
        z = acts[H + j]
        n = tanh_(g[2 * H + j])
        v = (<floating>1 - z) * n + z * h[j]
        h[j] = v
        out[j] = v
        acts[2 * H + j] = n


cdef inline void lstm_activations(const floating* g, floating* acts, Py_ssize_t units,
                                  Py_ssize_t H) noexcept nogil:
    """acts' i, f, g, o blocks (H apart) from the pre-activations g (same
    layout), ``units`` of each. One loop per activation: each iteration of a
    single fused loop (sigmoid, then c', then tanh(c')) was one long
    dependency chain, ~145 cycles a vector with too many instructions for the
    out-of-order core to overlap the next; short loops of independent
    iterations run at the core's throughput instead (an LSTM call at H=64,
    B=256, where the gate pass was ~30% of the time, 18% faster)."""
    cdef Py_ssize_t j
    for j in range(units):
        acts[j] = sigmoid(g[j])
    for j in range(units):
        acts[H + j] = sigmoid(g[H + j])
    for j in range(units):
        acts[2 * H + j] = tanh_(g[2 * H + j])
    for j in range(units):
        acts[3 * H + j] = sigmoid(g[3 * H + j])


cdef inline void lstm_row(const floating* g, floating* h, floating* c,
                          floating* out, floating* acts, Py_ssize_t units,
                          Py_ssize_t H) noexcept nogil:
    """acts: i, f, g, o. ``units`` of the H (the gate blocks' stride) from the
    pointers on."""
    cdef Py_ssize_t j
    cdef floating c_new, v
    lstm_activations(g, acts, units, H)
    for j in range(units):
        c_new = acts[H + j] * c[j] + acts[j] * acts[2 * H + j]
        c[j] = c_new
        v = acts[3 * H + j] * tanh_(c_new)
        h[j] = v
        out[j] = v


cdef inline void lstm_back_row(const floating* acts, const floating* c_prev, floating* dh,
                               floating* dc, floating* dg, Py_ssize_t H) noexcept nogil:
    """One LSTM row backward from lstm_row's acts (i, f, g, o) and c_{t-1}:
    dh (H) the gradient of h_t (zeroed: the product with W_hh adds that of
    h_{t-1}), dc (H) that of c_t in and of c_{t-1} out, dg (4H) those of the
    gates' pre-activations."""
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


# Below AXPY_MAX multiply-adds (_tuning.h) a batch-1 product is a plain loop,
# not a BLAS call.
from fastrnn._tuning cimport AXPY_MAX


cdef inline void _axpy_columns(const floating* v, Py_ssize_t K, const floating* w,
                               Py_ssize_t ldw, floating* y, Py_ssize_t width) noexcept nogil:
    """y (width,) += v (K,) @ w (K, width): y held in acc over the whole k loop.
    Called with a constant width that fits the vector registers, so that the
    compiler keeps acc there and streams only w through memory."""
    cdef floating acc[64]
    cdef Py_ssize_t k, j
    cdef floating vk
    cdef const floating* w_k
    for j in range(width):
        acc[j] = y[j]
    for k in range(K):
        vk = v[k]
        w_k = w + k * ldw
        for j in range(width):
            acc[j] += vk * w_k[j]
    for j in range(width):
        y[j] = acc[j]


cdef inline void axpy_product(const floating* v, Py_ssize_t K, const floating* w,
                              Py_ssize_t ldw, Py_ssize_t N, floating* y) noexcept nogil:
    """y (N,) += v (K,) @ w (K, N; rows ldw apart), in column blocks of 256
    bytes (8 AVX registers), then 32 bytes, then one column at a time. Measured
    (K=32, N=128, AVX2): 2.8x the speed of the plain loop over w's rows,
    which loads and stores all of y once per k."""
    cdef Py_ssize_t wide = 64 if floating is float else 32
    cdef Py_ssize_t narrow = 8 if floating is float else 4
    cdef Py_ssize_t n0 = 0, k, n
    cdef floating vk
    while n0 + wide <= N:
        _axpy_columns(v, K, w + n0, ldw, y + n0, wide)
        n0 += wide
    while n0 + narrow <= N:
        _axpy_columns(v, K, w + n0, ldw, y + n0, narrow)
        n0 += narrow
    if n0 < N:
        for k in range(K):
            vk = v[k]
            for n in range(n0, N):
                y[n] += vk * w[k * ldw + n]


# --- zoneout (Krueger et al. 2016), any cell kind ---
cdef struct Zoneout:
    double rate_h             # the probability that a unit of h keeps its old value
    double rate_c             # the same for the LSTM's c (0: no zoneout)
    const void* mask_h        # training: per row (t, b) 1 where the unit kept its old
    const void* mask_c        # value, 0 where it took the new one; NULL in inference
    void* keep                # scratch, 2 H per batch row: the old h, c (forward in
                              # inference), the gradients held past the gate pass (BPTT)


cdef inline int fill_zoneout(Zoneout* out, rates, const floating[:, ::1] mask_h,
                            const floating[:, ::1] mask_c, floating[::1] keep, Py_ssize_t R,
                            Py_ssize_t dirs, Py_ssize_t B, Py_ssize_t H, bint train) except -1:
    """The kernels' zoneout from a kernel entry's arguments, checked."""
    out.rate_h = out.rate_c = 0
    out.mask_h = out.mask_c = out.keep = NULL
    if rates is None:
        return 0
    out.rate_h, out.rate_c = rates
    if not (0 <= out.rate_h < 1 and 0 <= out.rate_c < 1):
        raise ValueError("zoneout rates must be in [0, 1)")
    if keep is None or keep.shape[0] != dirs * B * 2 * H:
        raise ValueError(f"zoneout needs a scratch of {dirs * B * 2 * H} values")
    out.keep = &keep[0]
    for mask, rate, name in ((mask_h, out.rate_h, "h"), (mask_c, out.rate_c, "c")):
        if train and rate > 0 and (mask is None or mask.shape[0] != R
                                   or mask.shape[1] != dirs * H):
            raise ValueError(f"zoneout in training needs a mask of shape ({R}, {dirs * H}) "
                             f"for {name}")
    if train:
        out.mask_h = NULL if mask_h is None else &mask_h[0, 0]
        out.mask_c = NULL if mask_c is None else &mask_c[0, 0]
    return 0


cdef inline const Zoneout* zone_part(Zoneout* out, const Zoneout* job, Py_ssize_t d,
                                      Py_ssize_t B, Py_ssize_t b_lo, Py_ssize_t mask_offset,
                                      Py_ssize_t H, floating* like) noexcept nogil:
    """A part's zoneout for direction d and batch rows from b_lo: the job's
    masks and scratch offset as the part's buffers are; NULL: no zoneout.
    (``like``: a pointer of the float type.)"""
    if job.rate_h == 0 and job.rate_c == 0:
        return NULL
    out.rate_h, out.rate_c = job.rate_h, job.rate_c
    out.mask_h = NULL if job.mask_h == NULL else <const floating*>job.mask_h + mask_offset
    out.mask_c = NULL if job.mask_c == NULL else <const floating*>job.mask_c + mask_offset
    out.keep = <floating*>job.keep + (d * B + b_lo) * 2 * H
    return out


# --- recurrent dropout (Keras' recurrent_dropout), training only ---
cdef struct RecurrentDropout:
    const void* mask          # (gates, B, H) of one direction from the part's first
                              # row: 0 or 1 / (1 - p), one per gate, row and sequence
    Py_ssize_t gate_stride    # B * H of the whole batch: from one gate's masks to the next
    void* scratch             # B * H of this part: a masked h, or a gate's dG . W
    const Packed* packs       # float32: each gate block's W_hh packed alone (G per
                              # direction) for the micro-kernel, or NULL: BLAS


cdef inline int fill_recurrent_dropout(RecurrentDropout* out,
                                      const floating[:, :, :, ::1] mask,
                                      floating[::1] scratch, Py_ssize_t dirs, Py_ssize_t G,
                                      Py_ssize_t B, Py_ssize_t H) except -1:
    """The kernels' recurrent dropout from a kernel entry's arguments,
    checked (mask None: none)."""
    out.mask = out.scratch = NULL
    out.packs = NULL
    out.gate_stride = B * H
    if mask is None:
        return 0
    if (mask.shape[0] != dirs or mask.shape[1] != G or mask.shape[2] != B
            or mask.shape[3] != H):
        raise ValueError(f"recurrent dropout needs masks of shape ({dirs}, {G}, {B}, {H})")
    if scratch is None or scratch.shape[0] != dirs * B * H:
        raise ValueError(f"recurrent dropout needs a scratch of {dirs * B * H} values")
    out.mask = &mask[0, 0, 0, 0]
    out.scratch = &scratch[0]
    return 0


cdef inline const RecurrentDropout* dropout_part(RecurrentDropout* out,
                                                 const RecurrentDropout* job, Py_ssize_t d,
                                                 Py_ssize_t G, Py_ssize_t B, Py_ssize_t b_lo,
                                                 Py_ssize_t H, floating* like) noexcept nogil:
    """A part's recurrent dropout for direction d and batch rows from b_lo;
    NULL: none. (``like``: a pointer of the float type.)"""
    if job.mask == NULL:
        return NULL
    out.mask = <const floating*>job.mask + (d * G * B + b_lo) * H
    out.gate_stride = job.gate_stride
    out.scratch = <floating*>job.scratch + (d * B + b_lo) * H
    out.packs = NULL if job.packs == NULL else job.packs + d * G
    return out


# --- gate options: the *_OPT cell kinds ---
# Activation kinds: ONNX's list (alpha, beta as ONNX defines them; Keras'
# activations are among them)
cdef enum:
    ACT_SIGMOID = 0
    ACT_TANH = 1
    ACT_RELU = 2
    ACT_AFFINE = 3             # alpha * x + beta ('linear': 1, 0)
    ACT_LEAKY_RELU = 4         # x if x >= 0 else alpha * x
    ACT_THRESHOLDED_RELU = 5   # x if x > alpha else 0 (ONNX Runtime's; ONNX's text: >=)
    ACT_SCALED_TANH = 6        # alpha * tanh(beta * x)
    ACT_HARD_SIGMOID = 7       # min(max(alpha * x + beta, 0), 1)
    ACT_ELU = 8                # x if x >= 0 else alpha * (e^x - 1)
    ACT_SOFTSIGN = 9           # x / (1 + |x|)
    ACT_SOFTPLUS = 10          # log(1 + e^x)


cdef struct Activation:
    int kind
    double alpha
    double beta


cdef struct GateOptions:
    Activation gate      # LSTM i, f, o; GRU r, z (ONNX's f)
    Activation cand      # LSTM g, GRU n, the RNN's only one (ONNX's g; the RNN's f)
    Activation cell      # LSTM h_t = o * cell(c_t) (ONNX's h)
    double clip          # > 0: every gate's and candidate's input clamped to
                         # [-clip, clip] (ONNX's clip; c_t is not clipped)
    bint input_forget    # LSTM: f = 1 - i (ONNX's input_forget)


# a direction's options as a row of floats: each activation's (kind, alpha,
# beta) for the gates, the candidate and the LSTM's cell, then clip (0: none)
# and input_forget (0 or 1)
cdef enum:
    OPTION_ROW = 11


cdef inline bint _read_activation(Activation* a, const double* spec) noexcept nogil:
    a.kind = <int>spec[0]
    a.alpha = spec[1]
    a.beta = spec[2]
    return ACT_SIGMOID <= spec[0] <= ACT_SOFTPLUS and a.kind == spec[0]


cdef inline bint read_options(GateOptions* out, const double* row) noexcept nogil:
    """Decode one direction's row (OPTION_ROW floats); False if an
    activation kind is unknown."""
    cdef bint known = (_read_activation(&out.gate, row) & _read_activation(&out.cand, row + 3)
                       & _read_activation(&out.cell, row + 6))
    out.clip = row[9]
    out.input_forget = row[10] != 0
    return known


cdef inline bint fill_options(GateOptions* out, const double[:, ::1] options, int cell,
                        Py_ssize_t dirs) except -1:
    """Decode ``options`` (dirs, OPTION_ROW) into out[:dirs]; whether the
    kind takes options (then they are required)."""
    cdef Py_ssize_t d
    if base_cell(cell) == cell:
        if options is not None:
            raise ValueError("options given for a cell kind without options")
        return False
    if options is None or options.shape[0] != dirs or options.shape[1] != OPTION_ROW:
        raise ValueError(f"expected options of shape ({dirs}, {OPTION_ROW})")
    for d in range(dirs):
        if not read_options(&out[d], &options[d, 0]):
            raise ValueError("options: unknown activation kind")
    return True


cdef inline floating act_value(const Activation* a, floating x) noexcept nogil:
    """The activation at x; NaN in, NaN out."""
    cdef floating alpha = <floating>a.alpha, beta = <floating>a.beta, v
    cdef int kind = a.kind
    if kind == ACT_SIGMOID:
        return sigmoid(x)
    if kind == ACT_TANH:
        return tanh_(x)
    if kind == ACT_RELU:
        return relu(x)
    if kind == ACT_AFFINE:
        return alpha * x + beta
    if kind == ACT_LEAKY_RELU:
        return alpha * x if x < 0 else x
    if kind == ACT_THRESHOLDED_RELU:
        return 0 if x <= alpha else x
    if kind == ACT_SCALED_TANH:
        return alpha * tanh_(beta * x)
    if kind == ACT_HARD_SIGMOID:
        v = alpha * x + beta
        v = 0 if v < 0 else v
        return 1 if v > 1 else v
    if kind == ACT_ELU:
        if x >= 0:
            return x
        if floating is float:
            v = expm1f(x)
        else:
            v = expm1(x)
        return alpha * v
    if kind == ACT_SOFTSIGN:
        return x / (1 + (x if x >= 0 else -x))
    # softplus as max(x, 0) + log(1 + e^-|x|): no overflow
    v = -x if x >= 0 else x
    if floating is float:
        v = log1pf(_exp_f32(v))
    else:
        v = log1p(exp(v))
    return (x if x > 0 else 0) + v


cdef inline floating act_slope(const Activation* a, floating x, floating y) noexcept nogil:
    """The activation's derivative at x, where y = act_value(a, x)."""
    cdef floating alpha = <floating>a.alpha, beta = <floating>a.beta, v
    cdef int kind = a.kind
    if kind == ACT_SIGMOID:
        return y * (1 - y)
    if kind == ACT_TANH:
        return 1 - y * y
    if kind == ACT_RELU:
        return 1 if x > 0 else 0
    if kind == ACT_AFFINE:
        return alpha
    if kind == ACT_LEAKY_RELU:
        return alpha if x < 0 else 1
    if kind == ACT_THRESHOLDED_RELU:
        return 0 if x <= alpha else 1
    if kind == ACT_SCALED_TANH:
        v = tanh_(beta * x)
        return alpha * beta * (1 - v * v)
    if kind == ACT_HARD_SIGMOID:
        v = alpha * x + beta
        return alpha if 0 < v < 1 else 0
    if kind == ACT_ELU:
        return y + alpha if x < 0 else 1
    if kind == ACT_SOFTSIGN:
        v = 1 + (x if x >= 0 else -x)
        return 1 / (v * v)
    return sigmoid(x)   # softplus


cdef inline floating clipped(floating x, floating clip) noexcept nogil:
    """x clamped to [-clip, clip] (clip 0: no clipping); NaN passes."""
    if clip > 0:
        x = clip if x > clip else x
        x = -clip if x < -clip else x
    return x


cdef inline floating clip_slope(floating x, floating clip) noexcept nogil:
    return 0 if clip > 0 and (x > clip or x < -clip) else 1


cdef inline void apply_activation(const Activation* a, const floating* src, floating* dst,
                                  Py_ssize_t n, floating clip) noexcept nogil:
    """dst = a(clipped(src)) for n values (dst may be src): the kind is
    decided once, so that each kind's loop vectorises as the plain cells'
    do (the same inline functions: the same values as act_value's)."""
    cdef Py_ssize_t j
    cdef floating alpha = <floating>a.alpha, beta = <floating>a.beta, v
    cdef int kind = a.kind
    if clip > 0:
        for j in range(n):
            v = src[j]
            v = clip if v > clip else v
            dst[j] = -clip if v < -clip else v
        src = dst
    if kind == ACT_SIGMOID:
        for j in range(n):
            dst[j] = sigmoid(src[j])
    elif kind == ACT_TANH:
        for j in range(n):
            dst[j] = tanh_(src[j])
    elif kind == ACT_RELU:
        for j in range(n):
            dst[j] = relu(src[j])
    elif kind == ACT_AFFINE:
        for j in range(n):
            dst[j] = alpha * src[j] + beta
    elif kind == ACT_HARD_SIGMOID:
        for j in range(n):
            v = alpha * src[j] + beta
            v = 0 if v < 0 else v
            dst[j] = 1 if v > 1 else v
    elif kind == ACT_SOFTSIGN:
        for j in range(n):
            v = src[j]
            dst[j] = v / (1 + (v if v >= 0 else -v))
    else:
        for j in range(n):
            dst[j] = act_value(a, src[j])


cdef inline void rnn_opt_row(floating* g, floating* h, floating* out, floating* acts,
                             Py_ssize_t H, const GateOptions* o) noexcept nogil:
    """acts: the pre-activation."""
    cdef Py_ssize_t j
    memcpy(acts, g, H * sizeof(floating))
    apply_activation(&o.cand, g, out, H, <floating>o.clip)
    if h != out:
        memcpy(h, out, H * sizeof(floating))


cdef inline void gru_opt_row(floating* gx, const floating* gh, const floating* h_old,
                             floating* h, floating* out, floating* acts, Py_ssize_t H,
                             const GateOptions* o) noexcept nogil:
    """acts: the pre-activations of r, z and n (gx_n + r * gh_n), and gh_n.
    The activations are written over gx's row (the step's scratch)."""
    cdef Py_ssize_t j
    cdef floating clip = <floating>o.clip
    cdef floating z, v
    for j in range(2 * H):
        acts[j] = gx[j] + gh[j]
    apply_activation(&o.gate, acts, gx, 2 * H, clip)    # r, z
    for j in range(H):
        acts[2 * H + j] = gx[2 * H + j] + gx[j] * gh[2 * H + j]
        acts[3 * H + j] = gh[2 * H + j]
    apply_activation(&o.cand, acts + 2 * H, gx + 2 * H, H, clip)   # n
    for j in range(H):
        z = gx[H + j]
        v = (<floating>1 - z) * gx[2 * H + j] + z * h_old[j]
        h[j] = v
        out[j] = v


cdef inline void gru_reset_gates_opt_row(floating* g, const floating* h, floating* acts,
                                         Py_ssize_t H, const GateOptions* o) noexcept nogil:
    """The reset-before GRU's first pass (as gru_reset_gates_row): acts the
    pre-activations of r and z, and r * h (r written over g's r block)."""
    cdef Py_ssize_t j
    memcpy(acts, g, 2 * H * sizeof(floating))
    apply_activation(&o.gate, g, g, H, <floating>o.clip)
    for j in range(H):
        acts[3 * H + j] = g[j] * h[j]


cdef inline void gru_reset_opt_row(floating* g, floating* h, floating* out,
                                   floating* acts, Py_ssize_t H,
                                   const GateOptions* o) noexcept nogil:
    """Its second pass: acts n's pre-activation (z and n written over g)."""
    cdef Py_ssize_t j
    cdef floating clip = <floating>o.clip
    cdef floating z, v
    memcpy(acts + 2 * H, g + 2 * H, H * sizeof(floating))
    apply_activation(&o.gate, acts + H, g + H, H, clip)
    apply_activation(&o.cand, g + 2 * H, g + 2 * H, H, clip)
    for j in range(H):
        z = g[H + j]
        v = (<floating>1 - z) * g[2 * H + j] + z * h[j]
        h[j] = v
        out[j] = v


cdef inline void lstm_opt_row(floating* g, floating* h, floating* c, floating* out,
                              floating* acts, Py_ssize_t H, const GateOptions* o,
                              const floating* peep) noexcept nogil:
    """acts: the pre-activations of i, f, g, o (peephole terms included) and
    c_t; the activations are written over g's row (the step's scratch).
    peep: the peephole weights (3 H: i, f, o) or NULL. ONNX's order: i and f
    see c_{t-1}, o sees c_t."""
    cdef Py_ssize_t j
    cdef floating clip = <floating>o.clip
    cdef floating c_new, v
    if peep != NULL:
        for j in range(H):
            acts[j] = g[j] + peep[j] * c[j]
            acts[H + j] = g[H + j] + peep[H + j] * c[j]
    else:
        memcpy(acts, g, 2 * H * sizeof(floating))
    memcpy(acts + 2 * H, g + 2 * H, H * sizeof(floating))
    apply_activation(&o.gate, acts, g, H, clip)                     # i
    if o.input_forget:
        for j in range(H):
            g[H + j] = <floating>1 - g[j]
    else:
        apply_activation(&o.gate, acts + H, g + H, H, clip)         # f
    apply_activation(&o.cand, acts + 2 * H, g + 2 * H, H, clip)     # g
    for j in range(H):
        c_new = g[H + j] * c[j] + g[j] * g[2 * H + j]
        c[j] = c_new
        acts[4 * H + j] = c_new
    if peep != NULL:
        for j in range(H):
            acts[3 * H + j] = g[3 * H + j] + peep[2 * H + j] * c[j]
    else:
        memcpy(acts + 3 * H, g + 3 * H, H * sizeof(floating))
    apply_activation(&o.gate, acts + 3 * H, g + 3 * H, H, clip)     # o
    apply_activation(&o.cell, c, out, H, 0)
    for j in range(H):
        v = g[3 * H + j] * out[j]
        h[j] = v
        out[j] = v


# --- what a layer's options add to its time loops (forward and BPTT) ---
cdef struct LayerExtras:
    bint has_options            # the *_OPT kinds: options per direction
    GateOptions options[2]
    const void* peep            # LSTM peepholes (dirs * 3 * H) or NULL
    Zoneout zone                # rates 0: none
    RecurrentDropout drop       # drop.mask NULL: none
    Packed drop_packs[8]        # drop.packs' entries: dirs x G gate blocks
    void* opt_scratch           # BPTT of the *_OPT kinds: OPTION_SCRATCH * H per part and
                                # direction


# values per hidden unit of the *_OPT kinds' BPTT scratch (their activations
# and slopes; _backward.pyx)
cdef enum:
    OPTION_SCRATCH = 6


cdef inline int fill_extras(LayerExtras* out, int cell, Py_ssize_t dirs, Py_ssize_t B,
                           Py_ssize_t H, Py_ssize_t R, bint train,
                           const double[:, ::1] options, const floating[::1] peepholes,
                           zoneout, const floating[:, ::1] zone_mask_h,
                           const floating[:, ::1] zone_mask_c, floating[::1] zone_keep,
                           const floating[:, :, :, ::1] dropout_masks,
                           floating[::1] dropout_scratch) except -1:
    """A kernel entry's options, peepholes, zoneout and recurrent dropout
    (see _forward.recur), checked."""
    out.has_options = fill_options(out.options, options, cell, dirs)
    out.opt_scratch = NULL
    out.peep = NULL
    if peepholes is not None:
        if cell != LSTM_OPT or peepholes.shape[0] != dirs * 3 * H:
            raise ValueError("peepholes do not fit the layer")
        out.peep = &peepholes[0]
    fill_zoneout(&out.zone, zoneout, zone_mask_h, zone_mask_c, zone_keep, R, dirs, B, H,
                 train)
    fill_recurrent_dropout(&out.drop, dropout_masks, dropout_scratch, dirs, num_gates(cell),
                           B, H)
    return 0


cdef inline const GateOptions* options_part(const LayerExtras* extras,
                                            Py_ssize_t d) noexcept nogil:
    return &extras.options[d] if extras.has_options else NULL
