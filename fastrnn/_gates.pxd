# Activations and the fused per-row gate arithmetic of every cell, inlined
# into the time loops. Each function updates one batch row of the state in
# place and writes the new h to the output row. Equations (PyTorch's):
#   RNN:  h' = act(g)                          g = x W_ih^T + b_ih + h W_hh^T + b_hh
#   GRU:  r = s(gx_r + gh_r), z = s(gx_z + gh_z), n = tanh(gx_n + r * gh_n)
#         h' = (1 - z) * n + z * h              gx = x W_ih^T + b_ih, gh = h W_hh^T + b_hh
#   LSTM: i, f, o = s(g_i), s(g_f), s(g_o); u = tanh(g_g)
#         c' = f * c + i * u, h' = o * tanh(c')

from cython cimport floating
from libc.math cimport exp, expf, tanh, tanhf


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


cdef inline void rnn_tanh_row(const floating* g, floating* h, floating* out,
                              Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating v
    for j in range(H):
        v = tanh_(g[j])
        h[j] = v
        out[j] = v


cdef inline void rnn_relu_row(const floating* g, floating* h, floating* out,
                              Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating v
    for j in range(H):
        v = relu(g[j])
        h[j] = v
        out[j] = v


cdef inline void gru_row(const floating* gx, const floating* gh, floating* h,
                         floating* out, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating r, z, n, v
    for j in range(H):
        r = sigmoid(gx[j] + gh[j])
        z = sigmoid(gx[H + j] + gh[H + j])
        n = tanh_(gx[2 * H + j] + r * gh[2 * H + j])
        v = (1 - z) * n + z * h[j]
        h[j] = v
        out[j] = v


cdef inline void lstm_row(const floating* g, floating* h, floating* c,
                          floating* out, Py_ssize_t H) noexcept nogil:
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
