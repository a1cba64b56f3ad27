"""A slow, readable NumPy reference of PyTorch's LSTM with a projection
(proj_size=P), forward and analytic BPTT, written from the equations:

    i, f, g, o = sigmoid / sigmoid / tanh / sigmoid of
                 W_ih x_t + b_ih + W_hh h_{t-1} + b_hh        (gate blocks i, f, g, o)
    c_t = f * c_{t-1} + i * g                                  (H values)
    h_t = W_hr (o * tanh(c_t))                                 (P values)

W_ih (4H, D_in), W_hh (4H, P), W_hr (P, H); a layer above the first reads
the previous layer's outputs, dirs * P values a step. Lengths have PyTorch's
packed semantics: each sequence runs over its own first lengths[b] steps (the
reverse direction from step lengths[b] - 1 back to 0), outputs past a length
are zero, the final states are each sequence's own.

It shares no code with fastrnn (nor with tests/reference.py): float64, one
sequence at a time, the reverse direction on an explicitly reversed copy, the
backward written step by step from the chain rule (checked against finite
differences of this forward and against PyTorch in tests/test_projection.py).
Parameters are read from a dict under PyTorch's names; a missing bias is zero
(bias=False) and gets no gradient.
"""
import numpy as np


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def names(k, d):
    """PyTorch's names of layer k, direction d, in PyTorch's state_dict order."""
    sfx = f"_l{k}" + ("_reverse" if d else "")
    return {"w_ih": "weight_ih" + sfx, "w_hh": "weight_hh" + sfx, "b_ih": "bias_ih" + sfx,
            "b_hh": "bias_hh" + sfx, "w_hr": "weight_hr" + sfx}


def state_names(k, d):
    """The learned initial states' names of layer k, direction d (fastrnn's)."""
    sfx = f"_l{k}" + ("_reverse" if d else "")
    return "initial_h" + sfx, "initial_c" + sfx


def direction_params(params, k, d):
    """Short name -> float64 array of layer k, direction d (zero biases when absent)."""
    p = {short: np.asarray(params[n], np.float64) for short, n in names(k, d).items()
         if n in params}
    rows = p["w_hh"].shape[0]
    p.setdefault("b_ih", np.zeros(rows))
    p.setdefault("b_hh", np.zeros(rows))
    return p


def step(p, x, h, c):
    """One step of one sequence: x (D_in,), h (P,), c (H,) -> (h', c', cache)."""
    pre = p["w_ih"] @ x + p["b_ih"] + p["w_hh"] @ h + p["b_hh"]
    a_i, a_f, a_g, a_o = np.split(pre, 4)
    i, f, g, o = sigmoid(a_i), sigmoid(a_f), np.tanh(a_g), sigmoid(a_o)
    c_new = f * c + i * g
    tc = np.tanh(c_new)
    m = o * tc                      # what the projection reads (H values)
    h_new = p["w_hr"] @ m           # P values
    cache = dict(x=x, h=h, c=c, i=i, f=f, g=g, o=o, tc=tc, m=m)
    return h_new, c_new, cache


def step_back(p, cache, dh, dc, grads):
    """Backward of one step: the gradients dh (P,) of h' and dc (H,) of c' ->
    (dx, dh, dc) of the step's inputs x, h, c; the parameter gradients are
    added into ``grads`` (short names)."""
    i, f, g, o, tc, m = (cache[n] for n in ("i", "f", "g", "o", "tc", "m"))
    grads["w_hr"] += np.outer(dh, m)
    dm = p["w_hr"].T @ dh
    do = dm * tc
    dc_total = dc + dm * o * (1.0 - tc ** 2)
    di = dc_total * g
    df = dc_total * cache["c"]
    dg = dc_total * i
    dpre = np.concatenate([di * i * (1.0 - i), df * f * (1.0 - f), dg * (1.0 - g ** 2),
                           do * o * (1.0 - o)])
    grads["w_ih"] += np.outer(dpre, cache["x"])
    grads["w_hh"] += np.outer(dpre, cache["h"])
    grads["b_ih"] += dpre
    grads["b_hh"] += dpre
    return p["w_ih"].T @ dpre, p["w_hh"].T @ dpre, dc_total * f


def _sizes(params, num_layers, bidirectional):
    dirs = 2 if bidirectional else 1
    P, H = np.shape(params["weight_hr_l0"])
    return dirs, P, H


def layer_forward(params, x, h0=None, c0=None, num_layers=1, bidirectional=False,
                  lengths=None):
    """Time-major x (T, B, D); h0 (L * dirs, B, P) and c0 (L * dirs, B, H),
    zeros when None -> (out (T, B, dirs * P) zero past each length, h_n,
    c_n, tape for ``layer_backward``)."""
    x = np.asarray(x, np.float64)
    T, B, _ = x.shape
    dirs, P, H = _sizes(params, num_layers, bidirectional)
    h0 = np.zeros((num_layers * dirs, B, P)) if h0 is None else np.asarray(h0, np.float64)
    c0 = np.zeros((num_layers * dirs, B, H)) if c0 is None else np.asarray(c0, np.float64)
    assert h0.shape == (num_layers * dirs, B, P), h0.shape
    assert c0.shape == (num_layers * dirs, B, H), c0.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    out = np.zeros((T, B, dirs * P))
    h_n = np.zeros(h0.shape)
    c_n = np.zeros(c0.shape)
    tape = []
    for b in range(B):
        seq = x[:lengths[b], b]
        seq_tape = []
        for k in range(num_layers):
            outputs = []
            for d in range(dirs):
                p = direction_params(params, k, d)
                h, c = h0[k * dirs + d, b].copy(), c0[k * dirs + d, b].copy()
                caches, hs = [], []
                for x_t in (seq[::-1] if d else seq):
                    h, c, cache = step(p, x_t, h, c)
                    caches.append(cache)
                    hs.append(h)
                hs = np.array(hs).reshape(len(caches), P)
                outputs.append(hs[::-1] if d else hs)
                h_n[k * dirs + d, b] = h
                c_n[k * dirs + d, b] = c
                seq_tape.append(caches)
            seq = np.concatenate(outputs, axis=1)
        out[:lengths[b], b] = seq
        tape.append(seq_tape)
    return out, h_n, c_n, (tape, lengths, num_layers, bidirectional)


def layer_backward(params, tape, dout, dh_n=None, dc_n=None):
    """BPTT of ``layer_forward``: dout (T, B, dirs * P) (its values past each
    length are ignored, as nothing there depends on the parameters), dh_n
    (L * dirs, B, P), dc_n (L * dirs, B, H) (zeros when None) -> (dx
    (T, B, D), dh0, dc0, grads by PyTorch's parameter names)."""
    tape, lengths, num_layers, bidirectional = tape
    dirs, P, H = _sizes(params, num_layers, bidirectional)
    dout = np.asarray(dout, np.float64)
    T, B = dout.shape[:2]
    S = num_layers * dirs
    dh_n = np.zeros((S, B, P)) if dh_n is None else np.asarray(dh_n, np.float64)
    dc_n = np.zeros((S, B, H)) if dc_n is None else np.asarray(dc_n, np.float64)
    grads = {}
    for k in range(num_layers):
        for d in range(dirs):
            for n in names(k, d).values():
                if n in params:
                    grads[n] = np.zeros(np.shape(params[n]))
    D = np.shape(params["weight_ih_l0"])[1]
    dx = np.zeros((T, B, D))
    dh0 = np.zeros((S, B, P))
    dc0 = np.zeros((S, B, H))
    for b in range(B):
        n_b = lengths[b]
        dseq = dout[:n_b, b]
        for k in reversed(range(num_layers)):
            dinput = 0.0
            for d in range(dirs):
                p = direction_params(params, k, d)
                short = {s: np.zeros_like(v) for s, v in p.items()}
                caches = tape[b][k * dirs + d]
                dh = dh_n[k * dirs + d, b].copy()
                dc = dc_n[k * dirs + d, b].copy()
                dh_steps = dseq[:, d * P:(d + 1) * P]
                if d:
                    dh_steps = dh_steps[::-1]          # processing order
                dxs = []
                for s in reversed(range(n_b)):
                    dx_t, dh, dc = step_back(p, caches[s], dh + dh_steps[s], dc, short)
                    dxs.append(dx_t)
                dxs = np.array(dxs[::-1]).reshape(n_b, -1)   # processing order
                dinput = dinput + (dxs[::-1] if d else dxs)
                dh0[k * dirs + d, b] = dh
                dc0[k * dirs + d, b] = dc
                for s, n in names(k, d).items():
                    if n in grads:
                        grads[n] += short[s]
            dseq = dinput
        dx[:n_b, b] = dseq
    return dx, dh0, dc0, grads


def init_params(rng, input_size, hidden_size, proj_size, num_layers=1, bidirectional=False,
                bias=True):
    """Random parameters under PyTorch's names, ~U(-1/sqrt(H), 1/sqrt(H))."""
    dirs = 2 if bidirectional else 1
    bound = 1.0 / np.sqrt(hidden_size)
    params = {}
    for k in range(num_layers):
        d_in = input_size if k == 0 else dirs * proj_size
        shapes = {"w_ih": (4 * hidden_size, d_in), "w_hh": (4 * hidden_size, proj_size),
                  "b_ih": (4 * hidden_size,), "b_hh": (4 * hidden_size,),
                  "w_hr": (proj_size, hidden_size)}
        for d in range(dirs):
            for short, n in names(k, d).items():
                if short.startswith("b") and not bias:
                    continue
                params[n] = rng.uniform(-bound, bound, shapes[short])
    return params
