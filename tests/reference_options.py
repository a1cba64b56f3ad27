"""A slow, readable NumPy oracle of the gate options (activation specs,
clip, input_forget, peepholes), forward and analytic BPTT, in float64.

Written from the equations (ONNX's operator text, with ONNX Runtime's
readings where the text is loose; see the notes by ``ACTIVATIONS`` and
``onnx_activation_attributes``). It shares no code with fastrnn and, like
tests/reference.py, runs one sequence at a time over only its own valid
steps, the reverse direction on an explicitly reversed copy.

Kinds: "rnn", "gru" (reset_after=True, PyTorch's), "gru_reset_before"
(reset_after=False: r multiplies h before W_hn) and "lstm". Gate orders are
PyTorch's: GRU r, z, n; LSTM i, f, g, o; peepholes (3H,) i, f, o.

Options (keyword arguments of every function here, as the layers take them):
``nonlinearity`` (rnn), ``activation``, ``recurrent_activation`` (gru, lstm),
``cell_activation`` (lstm; None = ``activation``), ``clip``, ``input_forget``
and ``peepholes`` (lstm). Each activation is a spec (a name, ``(name, alpha)``
or ``(name, alpha, beta)``) or, bidirectional, a list of two specs
[forward's, reverse's].
"""
import numpy as np

# name -> default (alpha, beta); None where the function takes no parameter.
# thresholded_relu is x if x > alpha else 0 with a strict '>': ONNX's operator
# text says 'x >= alpha', ONNX Runtime (rnn_activation_functors.h) computes
# 'x > alpha'; the two differ only at x == alpha exactly.
DEFAULTS = {
    "sigmoid": (None, None), "tanh": (None, None), "relu": (None, None),
    "linear": (None, None), "softsign": (None, None), "softplus": (None, None),
    "affine": (1.0, 0.0), "leaky_relu": (0.01, None), "thresholded_relu": (1.0, None),
    "scaled_tanh": (1.0, 1.0), "hard_sigmoid": (1.0 / 6.0, 0.5), "elu": (1.0, None),
}


def canonical(spec):
    """A spec -> (name, alpha, beta), alpha/beta None where unused."""
    if isinstance(spec, str):
        name, given = spec, ()
    else:
        name, given = spec[0], tuple(spec[1:])
    alpha, beta = DEFAULTS[name]
    if len(given) >= 1:
        alpha = float(given[0])
    if len(given) >= 2:
        beta = float(given[1])
    return name, alpha, beta


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def activate(spec, a):
    """(value, derivative) of an activation at the pre-activation a."""
    name, alpha, beta = canonical(spec)
    a = np.asarray(a, np.float64)
    if name == "sigmoid":
        s = _sigmoid(a)
        return s, s * (1.0 - s)
    if name == "tanh":
        t = np.tanh(a)
        return t, 1.0 - t * t
    if name == "relu":
        return np.maximum(a, 0.0), (a > 0).astype(np.float64)
    if name == "linear":
        return a.copy(), np.ones_like(a)
    if name == "affine":
        return alpha * a + beta, np.full_like(a, alpha)
    if name == "leaky_relu":
        return np.where(a >= 0, a, alpha * a), np.where(a >= 0, 1.0, alpha)
    if name == "thresholded_relu":
        return np.where(a > alpha, a, 0.0), (a > alpha).astype(np.float64)
    if name == "scaled_tanh":
        t = np.tanh(beta * a)
        return alpha * t, alpha * beta * (1.0 - t * t)
    if name == "hard_sigmoid":
        v = alpha * a + beta
        return np.clip(v, 0.0, 1.0), np.where((v > 0) & (v < 1), alpha, 0.0)
    if name == "elu":
        e = np.exp(np.minimum(a, 0.0))
        return np.where(a >= 0, a, alpha * (e - 1.0)), np.where(a >= 0, 1.0, alpha * e)
    if name == "softsign":
        d = 1.0 + np.abs(a)
        return a / d, 1.0 / (d * d)
    if name == "softplus":
        return np.logaddexp(0.0, a), _sigmoid(a)
    raise ValueError(f"unknown activation {name!r}")


def _clip(v, clip):
    """ONNX's clip of an activation's input, and its derivative."""
    if clip is None:
        return v, np.ones_like(v)
    return np.clip(v, -clip, clip), (np.abs(v) < clip).astype(np.float64)


def _per_direction(spec, d):
    return spec[d] if isinstance(spec, list) else spec


def gate_activations(kind, direction=0, nonlinearity="tanh", activation="tanh",
                     recurrent_activation="sigmoid", cell_activation=None, **_):
    """The activations of one direction: rnn [f]; gru [f (r, z), g (n)];
    lstm [f (i, f, o), g (candidate), h (of c_t)]."""
    if kind == "rnn":
        return [_per_direction(nonlinearity, direction)]
    f = _per_direction(recurrent_activation, direction)
    g = _per_direction(activation, direction)
    if kind in ("gru", "gru_reset_before"):
        return [f, g]
    h = g if cell_activation is None else _per_direction(cell_activation, direction)
    return [f, g, h]


GATES = {"rnn": 1, "gru": 3, "gru_reset_before": 3, "lstm": 4}


# --- one step, forward and backward ---------------------------------------------------
def step_forward(kind, p, acts, clip, input_forget, x, h, c):
    """One step of one sequence: x (D,), h, c (H,); p holds w_ih, w_hh,
    b_ih, b_hh, peep (None without peepholes). Returns h, c, cache."""
    cache = {"x": x, "h": h, "c": c}
    if kind == "rnn":
        a, m = _clip(p["w_ih"] @ x + p["b_ih"] + p["w_hh"] @ h + p["b_hh"], clip)
        h_new, dact = activate(acts[0], a)
        cache.update(m=m, dact=dact)
        return h_new, c, cache
    if kind in ("gru", "gru_reset_before"):
        f, g = acts
        x_r, x_z, x_n = np.split(p["w_ih"] @ x + p["b_ih"], 3)
        w_hr, w_hz, w_hn = np.split(p["w_hh"], 3)
        b_hr, b_hz, b_hn = np.split(p["b_hh"], 3)
        a_r, m_r = _clip(x_r + w_hr @ h + b_hr, clip)
        a_z, m_z = _clip(x_z + w_hz @ h + b_hz, clip)
        r, dr = activate(f, a_r)
        z, dz = activate(f, a_z)
        if kind == "gru":
            h_n = w_hn @ h + b_hn
            a_n, m_n = _clip(x_n + r * h_n, clip)
        else:
            h_n = None
            a_n, m_n = _clip(x_n + w_hn @ (r * h) + b_hn, clip)
        n, dn = activate(g, a_n)
        cache.update(r=r, z=z, n=n, h_n=h_n, dr=dr * m_r, dz=dz * m_z, dn=dn * m_n)
        return (1.0 - z) * n + z * h, c, cache
    # lstm
    f_act, g_act, h_act = acts
    z_i, z_f, z_g, z_o = np.split(p["w_ih"] @ x + p["b_ih"] + p["w_hh"] @ h + p["b_hh"], 4)
    P = p.get("peep")
    p_i, p_f, p_o = np.split(P, 3) if P is not None else (0.0, 0.0, 0.0)
    a_i, m_i = _clip(z_i + p_i * c, clip)
    i, di = activate(f_act, a_i)
    if input_forget:
        f, df = 1.0 - i, np.zeros_like(i)
    else:
        a_f, m_f = _clip(z_f + p_f * c, clip)
        f, df = activate(f_act, a_f)
        df = df * m_f
    a_g, m_g = _clip(z_g, clip)
    g, dg = activate(g_act, a_g)
    c_new = f * c + i * g
    a_o, m_o = _clip(z_o + p_o * c_new, clip)
    o, do = activate(f_act, a_o)
    hc, dhc = activate(h_act, c_new)                  # no clip on c_t
    cache.update(i=i, f=f, g=g, o=o, c_new=c_new, hc=hc, dhc=dhc, di=di * m_i, df=df,
                 dg=dg * m_g, do=do * m_o)
    return o * hc, c_new, cache


def step_backward(kind, p, cache, input_forget, dh, dc, grads):
    """Backward of one step: dh, dc the gradients of the step's h and c;
    accumulates the parameter gradients into grads; returns dx, dh_prev, dc_prev."""
    x, h = cache["x"], cache["h"]
    if kind == "rnn":
        da = dh * cache["dact"] * cache["m"]
        dz_ih = dz_hh = da
        dh_prev = p["w_hh"].T @ da
        dc_prev = dc
    elif kind in ("gru", "gru_reset_before"):
        r, z, n = cache["r"], cache["z"], cache["n"]
        da_n = dh * (1.0 - z) * cache["dn"]
        da_z = dh * (h - n) * cache["dz"]
        dh_prev = dh * z
        w_hr, w_hz, w_hn = np.split(p["w_hh"], 3)
        if kind == "gru":
            da_r = da_n * cache["h_n"] * cache["dr"]
            dz_ih = np.concatenate([da_r, da_z, da_n])
            dz_hh = np.concatenate([da_r, da_z, da_n * r])
            dh_prev = dh_prev + p["w_hh"].T @ dz_hh
        else:
            d_rh = w_hn.T @ da_n
            da_r = d_rh * h * cache["dr"]
            dz_ih = np.concatenate([da_r, da_z, da_n])
            dz_hh = dz_ih
            # W_hn multiplies r * h: its gradient and the path to h go through r
            dh_prev = dh_prev + w_hr.T @ da_r + w_hz.T @ da_z + d_rh * r
            grads["w_hh"] += np.concatenate([np.outer(da_r, h), np.outer(da_z, h),
                                             np.outer(da_n, r * h)])
            grads["b_hh"] += dz_hh
            grads["w_ih"] += np.outer(dz_ih, x)
            grads["b_ih"] += dz_ih
            return p["w_ih"].T @ dz_ih, dh_prev, dc
        dc_prev = dc
    else:
        c, c_new = cache["c"], cache["c_new"]
        i, f, g, o = cache["i"], cache["f"], cache["g"], cache["o"]
        P = p.get("peep")
        p_i, p_f, p_o = np.split(P, 3) if P is not None else (0.0, 0.0, 0.0)
        da_o = dh * cache["hc"] * cache["do"]
        dct = dc + dh * o * cache["dhc"] + da_o * p_o
        d_i = dct * g
        d_f = dct * c
        if input_forget:
            d_i = d_i - d_f
        da_i = d_i * cache["di"]
        da_f = d_f * cache["df"]                      # zero with input_forget
        da_g = dct * i * cache["dg"]
        dc_prev = dct * f + da_i * p_i + da_f * p_f
        if P is not None:
            grads["peep"] += np.concatenate([da_i * c, da_f * c, da_o * c_new])
        dz_ih = dz_hh = np.concatenate([da_i, da_f, da_g, da_o])
        dh_prev = p["w_hh"].T @ dz_hh
    grads["w_ih"] += np.outer(dz_ih, x)
    grads["w_hh"] += np.outer(dz_hh, h)
    grads["b_ih"] += dz_ih
    grads["b_hh"] += dz_hh
    return p["w_ih"].T @ dz_ih, dh_prev, dc_prev


# --- parameters -------------------------------------------------------------------------
_KEYS = (("w_ih", "weight_ih"), ("w_hh", "weight_hh"), ("b_ih", "bias_ih"),
         ("b_hh", "bias_hh"), ("peep", "weight_peephole"))


def _params(params, kind, sfx, H, peepholes):
    """fastrnn's named parameters -> one direction's w_ih, w_hh, b_ih, b_hh,
    peep in float64 (absent biases as zeros)."""
    G = GATES[kind]
    p = {}
    for key, name in _KEYS:
        value = params.get(name + sfx)
        if value is None:
            if key == "peep" and not peepholes:
                p[key] = None
                continue
            if key == "peep":
                raise KeyError(f"peepholes=True but no {name + sfx}")
            value = np.zeros(G * H)
        p[key] = np.array(value, np.float64)
    return p


# --- whole layers -------------------------------------------------------------------------
def _opts(kind, options):
    known = {"nonlinearity", "activation", "recurrent_activation", "cell_activation", "clip",
             "input_forget", "peepholes"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    return options.get("clip"), bool(options.get("input_forget", False)), \
        bool(options.get("peepholes", False))


def _run_layer(kind, params, x, h0, c0, num_layers, bidirectional, lengths, options):
    """Forward of every sequence; keeps each step's cache for the backward."""
    clip, input_forget, peepholes = _opts(kind, options)
    x = np.asarray(x, np.float64)
    T, B, _ = x.shape
    dirs = 2 if bidirectional else 1
    H = np.asarray(h0).shape[-1]
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    h0 = np.asarray(h0, np.float64)
    c0 = np.zeros_like(h0) if c0 is None else np.asarray(c0, np.float64)
    out = np.zeros((T, B, dirs * H))
    h_n = np.zeros(h0.shape)
    c_n = np.zeros(h0.shape)
    tapes = []                                        # tapes[b][k][d] = list of caches
    for b in range(B):
        seq = x[:lengths[b], b]
        tape_b = []
        for k in range(num_layers):
            tape_k, outputs = [], []
            for d in range(dirs):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                p = _params(params, kind, sfx, H, peepholes)
                acts = gate_activations(kind, d, **options)
                h, c = h0[k * dirs + d, b], c0[k * dirs + d, b]
                caches, hs = [], []
                for x_t in (seq if d == 0 else seq[::-1]):
                    h, c, cache = step_forward(kind, p, acts, clip, input_forget, x_t, h, c)
                    caches.append(cache)
                    hs.append(h)
                hs = np.array(hs).reshape(len(seq), H)
                outputs.append(hs if d == 0 else hs[::-1])
                h_n[k * dirs + d, b] = h
                c_n[k * dirs + d, b] = c
                tape_k.append((p, caches))
            tape_b.append(tape_k)
            seq = np.concatenate(outputs, axis=-1)
        tapes.append(tape_b)
        out[:lengths[b], b] = seq
    return out, h_n, c_n, tapes, lengths


def layer_forward(kind, params, x, h0, c0=None, num_layers=1, bidirectional=False,
                  lengths=None, **options):
    """A whole layer, time-major: x (T, B, D), h0 and c0 (layers * dirs, B, H);
    params by fastrnn's names. Returns out (T, B, dirs * H) with zeros past
    each length, h_n, c_n (None unless lstm)."""
    out, h_n, c_n, _, _ = _run_layer(kind, params, x, h0, c0, num_layers, bidirectional,
                                     lengths, options)
    return out, h_n, (c_n if kind == "lstm" else None)


def layer_backward(kind, params, x, h0, c0=None, num_layers=1, bidirectional=False,
                   lengths=None, dout=None, dh_n=None, dc_n=None, **options):
    """Analytic BPTT of the layer for the loss sum(out * dout) + sum(h_n *
    dh_n) + sum(c_n * dc_n). Returns dx, dh0, dc0 (None unless lstm) and the
    parameter gradients by fastrnn's names (every name in params)."""
    _, input_forget, _ = _opts(kind, options)
    out, h_n, c_n, tapes, lengths = _run_layer(kind, params, x, h0, c0, num_layers,
                                               bidirectional, lengths, options)
    dirs = 2 if bidirectional else 1
    H = h_n.shape[-1]
    T, B, D = np.shape(x)
    dout = np.zeros(out.shape) if dout is None else np.asarray(dout, np.float64)
    dh_n = np.zeros(h_n.shape) if dh_n is None else np.asarray(dh_n, np.float64)
    dc_n = np.zeros(h_n.shape) if dc_n is None else np.asarray(dc_n, np.float64)
    dx = np.zeros((T, B, D))
    dh0 = np.zeros(h_n.shape)
    dc0 = np.zeros(h_n.shape)
    names = {}
    grads = {}
    for k in range(num_layers):
        for d in range(dirs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            for key, name in _KEYS:
                if name + sfx in params:
                    names[(k, d, key)] = name + sfx
                    grads[name + sfx] = np.zeros(np.shape(params[name + sfx]))
    for b in range(B):
        L = lengths[b]
        d_seq = dout[:L, b]                           # (L, dirs * H) of the top layer
        for k in reversed(range(num_layers)):
            d_in = None
            for d in range(dirs):
                p, caches = tapes[b][k][d]
                g = {key: np.zeros_like(v) for key, v in p.items() if v is not None}
                dhs = d_seq[:, d * H:(d + 1) * H]
                if d == 1:
                    dhs = dhs[::-1]                   # the order the direction ran
                dh, dc = dh_n[k * dirs + d, b].copy(), dc_n[k * dirs + d, b].copy()
                dxs = []
                for t in reversed(range(L)):
                    dx_t, dh, dc = step_backward(kind, p, caches[t], input_forget,
                                                 dh + dhs[t], dc, g)
                    dxs.append(dx_t)
                dxs = np.array(dxs[::-1]).reshape(L, -1)
                if d == 1:
                    dxs = dxs[::-1]
                d_in = dxs if d_in is None else d_in + dxs
                dh0[k * dirs + d, b] = dh
                dc0[k * dirs + d, b] = dc
                for key, value in g.items():
                    if (k, d, key) in names:
                        grads[names[(k, d, key)]] += value
            d_seq = d_in
        dx[:L, b] = d_seq
    return dx, dh0, (dc0 if kind == "lstm" else None), grads


# --- cells ----------------------------------------------------------------------------------
def cell_forward(kind, params, x, h, c=None, **options):
    """A cell call on a batch: x (B, D), h, c (B, H); params named weight_ih, ... .
    Returns h', c' (None unless lstm)."""
    clip, input_forget, peepholes = _opts(kind, options)
    H = np.shape(h)[-1]
    p = _params(params, kind, "", H, peepholes)
    acts = gate_activations(kind, 0, **options)
    x, h = np.asarray(x, np.float64), np.asarray(h, np.float64)
    c = np.zeros_like(h) if c is None else np.asarray(c, np.float64)
    hs, cs = [], []
    for b in range(x.shape[0]):
        h_b, c_b, _ = step_forward(kind, p, acts, clip, input_forget, x[b], h[b], c[b])
        hs.append(h_b)
        cs.append(c_b)
    return np.array(hs), (np.array(cs) if kind == "lstm" else None)


def cell_backward(kind, params, x, h, c=None, dh_new=None, dc_new=None, **options):
    """Backward of a cell call for sum(h' * dh_new) + sum(c' * dc_new).
    Returns dx, dh, dc (None unless lstm), the gradients by name."""
    clip, input_forget, peepholes = _opts(kind, options)
    H = np.shape(h)[-1]
    p = _params(params, kind, "", H, peepholes)
    acts = gate_activations(kind, 0, **options)
    x, h = np.asarray(x, np.float64), np.asarray(h, np.float64)
    c = np.zeros_like(h) if c is None else np.asarray(c, np.float64)
    dc_new = np.zeros_like(h) if dc_new is None else np.asarray(dc_new, np.float64)
    g = {key: np.zeros_like(v) for key, v in p.items() if v is not None}
    dx, dh, dc = [], [], []
    for b in range(x.shape[0]):
        _, _, cache = step_forward(kind, p, acts, clip, input_forget, x[b], h[b], c[b])
        r = step_backward(kind, p, cache, input_forget, np.asarray(dh_new[b], np.float64),
                          dc_new[b], g)
        dx.append(r[0])
        dh.append(r[1])
        dc.append(r[2])
    grads = {name: g[key] for key, name in _KEYS if name in params}
    return np.array(dx), np.array(dh), (np.array(dc) if kind == "lstm" else None), grads


# --- ONNX -----------------------------------------------------------------------------------
ONNX_NAMES = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "affine": "Affine",
              "leaky_relu": "LeakyRelu", "thresholded_relu": "ThresholdedRelu",
              "scaled_tanh": "ScaledTanh", "hard_sigmoid": "HardSigmoid", "elu": "Elu",
              "softsign": "Softsign", "softplus": "Softplus"}
_FROM_ONNX = {v.lower(): k for k, v in ONNX_NAMES.items()}
# which of alpha, beta each ONNX function reads (ONNX Runtime's NameToArgUsageMap)
_USES = {"affine": (True, True), "leaky_relu": (True, False),
         "thresholded_relu": (True, False), "scaled_tanh": (True, True),
         "hard_sigmoid": (True, True), "elu": (True, False)}
# ONNX Runtime's LSTM/GRU defaults for an alpha/beta the node does not give
# (rnn_helpers.cc NameToArgDefaultsMap; 0 for every other function)
ORT_DEFAULTS = {"leaky_relu": (0.01, 0.0), "hard_sigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}


def onnx_activation_attributes(specs):
    """Specs (every direction's, in node order) -> the node's activations,
    activation_alpha, activation_beta, alpha/beta written for every function
    that reads them, consumed in order: ONNX Runtime's LSTM and GRU read the
    two lists compactly (the k-th alpha goes to the k-th function that takes
    an alpha), not one entry per function. 'linear' is Affine(1, 0)."""
    names, alphas, betas = [], [], []
    for spec in specs:
        name, alpha, beta = canonical(spec)
        if name == "linear":
            name, alpha, beta = "affine", 1.0, 0.0
        names.append(ONNX_NAMES[name])
        uses_alpha, uses_beta = _USES.get(name, (False, False))
        if uses_alpha:
            alphas.append(alpha)
        if uses_beta:
            betas.append(beta)
    return names, alphas, betas


def specs_from_onnx_attributes(names, alphas=(), betas=()):
    """The inverse, as ONNX Runtime's LSTM/GRU read a node (compact lists,
    its defaults where a list runs out)."""
    alphas, betas = list(alphas), list(betas)
    specs = []
    for onnx_name in names:
        name = _FROM_ONNX[onnx_name.lower()]
        uses_alpha, uses_beta = _USES.get(name, (False, False))
        if not (uses_alpha or uses_beta):
            specs.append(name)
            continue
        default_alpha, default_beta = ORT_DEFAULTS.get(name, (0.0, 0.0))
        alpha = alphas.pop(0) if uses_alpha and alphas else default_alpha
        beta = betas.pop(0) if uses_beta and betas else default_beta
        specs.append((name, alpha, beta) if uses_beta else (name, alpha))
    return specs


ONNX_ORDER = {"rnn": [0], "gru": [1, 0, 2], "gru_reset_before": [1, 0, 2],
              "lstm": [0, 3, 1, 2]}
PEEPHOLE_TO_ONNX = [0, 2, 1]                          # fastrnn i, f, o -> ONNX i, o, f


def to_onnx_weights(kind, params, k=0, bidirectional=False):
    """One layer's fastrnn parameters -> ONNX W, R, B (and P or None)."""
    dirs = 2 if bidirectional else 1
    order = ONNX_ORDER[kind]

    def reorder(a, blocks=order):
        parts = np.split(np.asarray(a), len(blocks), axis=0)
        return np.concatenate([parts[j] for j in blocks], axis=0)

    sfx = [f"_l{k}", f"_l{k}_reverse"][:dirs]
    W = np.stack([reorder(params["weight_ih" + s]) for s in sfx])
    R = np.stack([reorder(params["weight_hh" + s]) for s in sfx])
    B = np.stack([np.concatenate([reorder(params["bias_ih" + s]),
                                  reorder(params["bias_hh" + s])]) for s in sfx])
    P = None
    if "weight_peephole" + sfx[0] in params:
        P = np.stack([reorder(params["weight_peephole" + s], PEEPHOLE_TO_ONNX) for s in sfx])
    return W, R, B, P
