# Activations and the fused per-row gate arithmetic of every cell, inlined
# into the time loops. Each function updates one batch row of the state in
# place and writes the new h to the output row; in training (acts != NULL)
# it also saves the activations backward needs. Equations (PyTorch's):
#   RNN:  h' = act(g)                          g = x W_ih^T + b_ih + h W_hh^T + b_hh
#   GRU:  r = s(gx_r + gh_r), z = s(gx_z + gh_z), n = tanh(gx_n + r * gh_n)
#         h' = (1 - z) * n + z * h              gx = x W_ih^T + b_ih, gh = h W_hh^T + b_hh
#   LSTM: i, f, o = s(g_i), s(g_f), s(g_o); u = tanh(g_g)
#         c' = f * c + i * u, h' = o * tanh(c')

from cython cimport floating
from libc.math cimport exp, expf, tanh, tanhf

cdef extern from "_fpenv.h":
    unsigned int fastrnn_flush_denormals() noexcept nogil
    void fastrnn_restore_fpenv(unsigned int old) noexcept nogil


# cell kinds, shared by the forward and backward kernels
cdef enum:
    RNN_TANH = 0
    RNN_RELU = 1
    GRU = 2
    LSTM = 3


cdef inline Py_ssize_t num_gates(int cell) noexcept nogil:
    """G: gate blocks of W_ih / W_hh."""
    if cell == LSTM:
        return 4
    if cell == GRU:
        return 3
    return 1


cdef inline Py_ssize_t num_saved(int cell) noexcept nogil:
    """S / H: activations saved per step for backward (GRU adds W_hn h + b_hn)."""
    if cell == LSTM or cell == GRU:
        return 4
    return 1


cdef inline floating sigmoid(floating v) noexcept nogil:
    if floating is float:
        return <float>1 / (<float>1 + expf(-v))
    else:
        return 1.0 / (1.0 + exp(-v))


cdef inline floating tanh_(floating v) noexcept nogil:
    if floating is float:
        return tanhf(v)
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
        if acts != NULL:
            acts[j] = v


cdef inline void gru_row(const floating* gx, const floating* gh, floating* h,
                         floating* out, floating* acts, Py_ssize_t H) noexcept nogil:
    """acts: r, z, n and gh_n = W_hn h + b_hn."""
    cdef Py_ssize_t j
    cdef floating r, z, n, v
    for j in range(H):
        r = sigmoid(gx[j] + gh[j])
        z = sigmoid(gx[H + j] + gh[H + j])
        n = tanh_(gx[2 * H + j] + r * gh[2 * H + j])
        v = (1 - z) * n + z * h[j]
        h[j] = v
        out[j] = v
        if acts != NULL:
            acts[j] = r
            acts[H + j] = z
            acts[2 * H + j] = n
            acts[3 * H + j] = gh[2 * H + j]


cdef inline void lstm_row(const floating* g, floating* h, floating* c,
                          floating* out, floating* acts, Py_ssize_t H) noexcept nogil:
    """acts: i, f, g, o."""
    cdef Py_ssize_t j
    cdef floating i, f, u, o, c_new, v
    for j in range(H):
        i = sigmoid(g[j])
        f = sigmoid(g[H + j])
        u = tanh_(g[2 * H + j])
        o = sigmoid(g[3 * H + j])
        c_new = f * c[j] + i * u
        c[j] = c_new
        v = o * tanh_(c_new)
        h[j] = v
        out[j] = v
        if acts != NULL:
            acts[j] = i
            acts[H + j] = f
            acts[2 * H + j] = u
            acts[3 * H + j] = o
