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
from libc.math cimport exp, tanh
from libc.stdint cimport int32_t
from libc.string cimport memcpy

cdef extern from "_fpenv.h":
    unsigned int fastrnn_flush_denormals() noexcept nogil
    void fastrnn_restore_fpenv(unsigned int old) noexcept nogil


# cell kinds, shared by the forward and backward kernels
cdef enum:
    RNN_TANH = 0
    RNN_RELU = 1
    GRU = 2
    LSTM = 3
    GRU_RESET_BEFORE = 4


cdef inline Py_ssize_t num_gates(int cell) noexcept nogil:
    """G: gate blocks of W_ih / W_hh."""
    if cell == LSTM:
        return 4
    if cell == GRU or cell == GRU_RESET_BEFORE:
        return 3
    return 1


cdef inline Py_ssize_t num_saved(int cell) noexcept nogil:
    """S / H: activations saved per step for backward (the GRU adds W_hn h +
    b_hn, the reset-before GRU r * h)."""
    if cell != RNN_TANH and cell != RNN_RELU:
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
    cdef Py_ssize_t j
    cdef floating r, z, n, v
    for j in range(units):
        r = sigmoid(gx[j] + gh[j])
        z = sigmoid(gx[H + j] + gh[H + j])
        n = tanh_(gx[2 * H + j] + r * gh[2 * H + j])
        v = (<floating>1 - z) * n + z * h_old[j]
        h[j] = v
        out[j] = v
        acts[j] = r
        acts[H + j] = z
        acts[2 * H + j] = n
        acts[3 * H + j] = gh[2 * H + j]


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


cdef inline void lstm_row(const floating* g, floating* h, floating* c,
                          floating* out, floating* acts, Py_ssize_t units,
                          Py_ssize_t H) noexcept nogil:
    """acts: i, f, g, o. ``units`` of the H (the gate blocks' stride) from the
    pointers on."""
    cdef Py_ssize_t j
    cdef floating i, f, u, o, c_new, v
    for j in range(units):
        i = sigmoid(g[j])
        f = sigmoid(g[H + j])
        u = tanh_(g[2 * H + j])
        o = sigmoid(g[3 * H + j])
        c_new = f * c[j] + i * u
        c[j] = c_new
        v = o * tanh_(c_new)
        h[j] = v
        out[j] = v
        acts[j] = i
        acts[H + j] = f
        acts[2 * H + j] = u
        acts[3 * H + j] = o


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
