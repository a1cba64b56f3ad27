"""A slow, readable NumPy reference of the layer-normalised LSTM and GRU
(layer_norm=True), forward and analytic BPTT, written from the equations:

    LN(v; a, b) = a * (v - mean(v)) / sqrt(var(v) + 1e-5) + b   (over the row's values)

    LSTM: pre = LN(W_ih x; a_ih, b_ih) + LN(W_hh h; a_hh, b_hh) + b_ih + b_hh
          i, f, o = sigmoid(.), g = tanh(.); c' = f c + i g; h' = o tanh(LN(c'; a_c, b_c))
    GRU:  gx = LN(W_ih x; a_ih, b_ih) + b_ih; gh = LN(W_hh h; a_hh, b_hh) + b_hh
          r = sigmoid(gx_r + gh_r), z = sigmoid(gx_z + gh_z), n = tanh(gx_n + r gh_n)
          h' = (1 - z) n + z h

It shares no code with fastrnn and works differently on purpose: float64, one
sequence at a time over its own valid steps, the reverse direction on an
explicitly reversed copy, and the backward written step by step from the
chain rule (checked against finite differences of this forward in the tests).
"""
import numpy as np

EPS = 1e-5
GATES = {"lstm": 4, "gru": 3}


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def layer_norm(v, gain, bias):
    """(LN(v), normalised v, 1 / std) over the last axis."""
    mean = v.mean()
    rstd = 1.0 / np.sqrt(((v - mean) ** 2).mean() + EPS)
    vhat = (v - mean) * rstd
    return gain * vhat + bias, vhat, rstd


def layer_norm_back(dy, gain, vhat, rstd):
    """(dv, dgain, dbias) of y = gain * vhat + bias."""
    dvhat = dy * gain
    dv = rstd * (dvhat - dvhat.mean() - vhat * (dvhat * vhat).mean())
    return dv, dy * vhat, dy


def names(k, d, cell=False):
    """The parameter names of layer k, direction d (a cell's: no suffix)."""
    sfx = "" if cell else f"_l{k}" + ("_reverse" if d else "")
    base = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    ln = ["ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_cell_weight",
          "ln_cell_bias"]
    return [n + sfx for n in base], [n + sfx for n in ln]


def _direction_params(kind, params, k, d, cell=False):
    base, ln = names(k, d, cell)
    p = {short: np.asarray(params[n], np.float64) for short, n in
         zip(("w_ih", "w_hh", "b_ih", "b_hh"), base) if n in params}
    GH = p["w_hh"].shape[0]
    p.setdefault("b_ih", np.zeros(GH))
    p.setdefault("b_hh", np.zeros(GH))
    for short, n in zip(("a_ih", "s_ih", "a_hh", "s_hh", "a_c", "s_c"), ln):
        if n in params:
            p[short] = np.asarray(params[n], np.float64)
    return p


def step(kind, p, x, h, c):
    """One step of one sequence: x (D,), h, c (H,) -> (h', c', cache)."""
    ax, xhat, rx = layer_norm(p["w_ih"] @ x, p["a_ih"], p["s_ih"])
    ah, hhat, rh = layer_norm(p["w_hh"] @ h, p["a_hh"], p["s_hh"])
    cache = dict(x=x, h=h, c=c, xhat=xhat, rx=rx, hhat=hhat, rh=rh)
    if kind == "lstm":
        pre = ax + ah + p["b_ih"] + p["b_hh"]
        pi, pf, pg, po = np.split(pre, 4)
        i, f, g, o = sigmoid(pi), sigmoid(pf), np.tanh(pg), sigmoid(po)
        c_new = f * c + i * g
        lc, chat, rc = layer_norm(c_new, p["a_c"], p["s_c"])
        tc = np.tanh(lc)
        cache.update(i=i, f=f, g=g, o=o, chat=chat, rc=rc, tc=tc)
        return o * tc, c_new, cache
    gx = ax + p["b_ih"]
    gh = ah + p["b_hh"]
    r = sigmoid(gx[:len(h)] + gh[:len(h)])
    z = sigmoid(gx[len(h):2 * len(h)] + gh[len(h):2 * len(h)])
    n = np.tanh(gx[2 * len(h):] + r * gh[2 * len(h):])
    cache.update(r=r, z=z, n=n, gh_n=gh[2 * len(h):])
    return (1 - z) * n + z * h, None, cache


def step_back(kind, p, cache, dh, dc, grads):
    """Backward of one step: dh, dc of (h', c') -> dx, dh, dc of the step's
    inputs; parameter gradients added into ``grads`` (short names)."""
    h, x = cache["h"], cache["x"]
    H = len(h)
    if kind == "lstm":
        i, f, g, o, tc = (cache[n] for n in ("i", "f", "g", "o", "tc"))
        do = dh * tc
        dlc = dh * o * (1 - tc ** 2)
        dc_new, da_c, ds_c = layer_norm_back(dlc, p["a_c"], cache["chat"], cache["rc"])
        grads["a_c"] += da_c
        grads["s_c"] += ds_c
        dc_new = dc_new + dc
        dpre = np.concatenate([dc_new * g * i * (1 - i), dc_new * cache["c"] * f * (1 - f),
                               dc_new * i * (1 - g ** 2), do * o * (1 - o)])
        dc_prev = dc_new * f
        dx_side = dh_side = dpre
        dh_direct = np.zeros(H)
    else:
        r, z, n = cache["r"], cache["z"], cache["n"]
        dn = dh * (1 - z) * (1 - n ** 2)
        dz = dh * (h - n) * z * (1 - z)
        dr = dn * cache["gh_n"] * r * (1 - r)
        dx_side = np.concatenate([dr, dz, dn])
        dh_side = np.concatenate([dr, dz, dn * r])
        dh_direct = dh * z
        dc_prev = None
    grads["b_ih"] += dx_side
    grads["b_hh"] += dh_side
    dax, da_ih, ds_ih = layer_norm_back(dx_side, p["a_ih"], cache["xhat"], cache["rx"])
    dah, da_hh, ds_hh = layer_norm_back(dh_side, p["a_hh"], cache["hhat"], cache["rh"])
    grads["a_ih"] += da_ih
    grads["s_ih"] += ds_ih
    grads["a_hh"] += da_hh
    grads["s_hh"] += ds_hh
    grads["w_ih"] += np.outer(dax, x)
    grads["w_hh"] += np.outer(dah, h)
    return p["w_ih"].T @ dax, dh_direct + p["w_hh"].T @ dah, dc_prev


def layer_forward(kind, params, x, h0, c0=None, num_layers=1, bidirectional=False,
                  lengths=None):
    """Time-major x (T, B, D), h0 (and c0) (layers * dirs, B, H) -> (out
    (T, B, dirs * H) zero past each length, h_n, c_n, tape for backward)."""
    x = np.asarray(x, np.float64)
    T, B, _ = x.shape
    dirs = 2 if bidirectional else 1
    H = h0.shape[-1]
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    out = np.zeros((T, B, dirs * H))
    h_n = np.zeros(h0.shape)
    c_n = np.zeros(h0.shape)
    tape = []
    for b in range(B):
        seq = x[:lengths[b], b]
        seq_tape = []
        for k in range(num_layers):
            outputs = []
            for d in range(dirs):
                p = _direction_params(kind, params, k, d)
                h = np.asarray(h0[k * dirs + d, b], np.float64)
                c = None if c0 is None else np.asarray(c0[k * dirs + d, b], np.float64)
                caches, hs = [], []
                for x_t in (seq[::-1] if d else seq):
                    h, c, cache = step(kind, p, x_t, h, c)
                    caches.append(cache)
                    hs.append(h)
                hs = np.array(hs)
                outputs.append(hs[::-1] if d else hs)
                h_n[k * dirs + d, b] = h
                if c is not None:
                    c_n[k * dirs + d, b] = c
                seq_tape.append(caches)
            seq = np.concatenate(outputs, axis=1)
        out[:lengths[b], b] = seq
        tape.append(seq_tape)
    return out, h_n, (c_n if kind == "lstm" else None), (tape, lengths)


def layer_backward(kind, params, tape, dout, dh_n, dc_n=None, num_layers=1,
                   bidirectional=False):
    """BPTT of ``layer_forward``: dout (T, B, dirs * H), dh_n (and dc_n)
    -> (dx (T, B, D), dh0, dc0, grads by parameter name)."""
    tape, lengths = tape
    dirs = 2 if bidirectional else 1
    T, B = dout.shape[:2]
    H = dh_n.shape[-1]
    grads = {}
    for k in range(num_layers):
        for d in range(dirs):
            p = _direction_params(kind, params, k, d)
            base, ln = names(k, d)
            for short, n in zip(("w_ih", "w_hh", "b_ih", "b_hh", "a_ih", "s_ih", "a_hh",
                                 "s_hh", "a_c", "s_c"), base + ln):
                if n in params:
                    grads[n] = np.zeros(np.shape(params[n]))
    D = np.shape(params["weight_ih_l0"])[1]
    dx = np.zeros((T, B, D))
    dh0 = np.zeros(dh_n.shape)
    dc0 = np.zeros(dh_n.shape)
    for b in range(B):
        L_b = lengths[b]
        dseq = np.asarray(dout[:L_b, b], np.float64)
        for k in reversed(range(num_layers)):
            dinput = 0
            for d in range(dirs):
                p = _direction_params(kind, params, k, d)
                short_grads = {s: np.zeros_like(v) for s, v in p.items()}
                caches = tape[b][k * dirs + d]
                dh = np.asarray(dh_n[k * dirs + d, b], np.float64).copy()
                dc = (np.asarray(dc_n[k * dirs + d, b], np.float64).copy()
                      if kind == "lstm" else None)
                dh_steps = dseq[:, d * H:(d + 1) * H]
                if d:
                    dh_steps = dh_steps[::-1]
                dxs = []
                for s in reversed(range(L_b)):
                    dx_t, dh, dc = step_back(kind, p, caches[s], dh + dh_steps[s], dc,
                                             short_grads)
                    dxs.append(dx_t)
                dxs = np.array(dxs[::-1])   # in processing order
                dinput = dinput + (dxs[::-1] if d else dxs)
                dh0[k * dirs + d, b] = dh
                if dc is not None:
                    dc0[k * dirs + d, b] = dc
                base, ln = names(k, d)
                for short, n in zip(("w_ih", "w_hh", "b_ih", "b_hh", "a_ih", "s_ih", "a_hh",
                                     "s_hh", "a_c", "s_c"), base + ln):
                    if n in grads:
                        grads[n] += short_grads[short]
            dseq = dinput
        dx[:L_b, b] = dseq
    return dx, dh0, (dc0 if kind == "lstm" else None), grads
