"""A slow, readable NumPy reference of every cell and layer, written from the
equations (PyTorch's), used as the oracle of the tests.

It shares no code with fastrnn and works differently on purpose: in float64,
one sequence at a time, each over only its own valid steps, and the reverse
direction on an explicitly reversed copy of the sequence.
"""
import numpy as np

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "gru_reset_before": 3, "lstm": 4}


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def cell_step(kind, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step for a batch: x (B, D), h and c (B, H) -> new (h, c)."""
    if kind in ("rnn_tanh", "rnn_relu"):
        a = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        return (np.tanh(a) if kind == "rnn_tanh" else np.maximum(a, 0.0)), c
    if kind == "gru":
        x_r, x_z, x_n = np.split(x @ w_ih.T + b_ih, 3, axis=-1)
        h_r, h_z, h_n = np.split(h @ w_hh.T + b_hh, 3, axis=-1)
        r = sigmoid(x_r + h_r)
        z = sigmoid(x_z + h_z)
        n = np.tanh(x_n + r * h_n)
        return (1.0 - z) * n + z * h, c
    if kind == "gru_reset_before":
        # Keras' reset_after=False: r multiplies h before W_hn
        x_r, x_z, x_n = np.split(x @ w_ih.T + b_ih, 3, axis=-1)
        w_hr, w_hz, w_hn = np.split(w_hh, 3, axis=0)
        b_hr, b_hz, b_hn = np.split(b_hh, 3)
        r = sigmoid(x_r + h @ w_hr.T + b_hr)
        z = sigmoid(x_z + h @ w_hz.T + b_hz)
        n = np.tanh(x_n + (r * h) @ w_hn.T + b_hn)
        return (1.0 - z) * n + z * h, c
    if kind == "lstm":
        i, f, g, o = np.split(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh, 4, axis=-1)
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        return sigmoid(o) * np.tanh(c_new), c_new
    raise ValueError(kind)


def _params64(params, names, hidden_size, gates):
    w_ih, w_hh, b_ih, b_hh = (params.get(n) for n in names)
    zeros = np.zeros(gates * hidden_size)
    return (np.asarray(w_ih, np.float64), np.asarray(w_hh, np.float64),
            zeros if b_ih is None else np.asarray(b_ih, np.float64),
            zeros if b_hh is None else np.asarray(b_hh, np.float64))


def cell_forward(kind, params, x, h, c=None):
    """A cell call: x (B, D), h, c (B, H); params named weight_ih, ... ."""
    hidden_size = np.asarray(params["weight_hh"]).shape[1]
    p = _params64(params, ("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                  hidden_size, GATES[kind])
    return cell_step(kind, np.asarray(x, np.float64), np.asarray(h, np.float64),
                     None if c is None else np.asarray(c, np.float64), *p)


def layer_forward(kind, params, x, h0, c0=None, num_layers=1, bidirectional=False,
                  lengths=None):
    """A whole layer, time-major: x (T, B, D), h0 and c0 (layers * dirs, B, H).

    Returns out (T, B, dirs * H) with zeros past each length, h_n, c_n.
    """
    x = np.asarray(x, np.float64)
    T, B, _ = x.shape
    dirs = 2 if bidirectional else 1
    H = h0.shape[-1]
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    out = np.zeros((T, B, dirs * H))
    h_n = np.zeros_like(h0, dtype=np.float64)
    c_n = np.zeros_like(h0, dtype=np.float64)
    for b in range(B):
        seq = x[:lengths[b], b]                      # (len, D): valid steps only
        for k in range(num_layers):
            direction_outputs = []
            for d in range(dirs):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                p = _params64(params, [n + sfx for n in ("weight_ih", "weight_hh",
                                                         "bias_ih", "bias_hh")],
                              H, GATES[kind])
                h = np.asarray(h0[k * dirs + d, b:b + 1], np.float64)
                c = None if c0 is None else np.asarray(c0[k * dirs + d, b:b + 1], np.float64)
                steps = seq if d == 0 else seq[::-1]
                hs = []
                for x_t in steps:
                    h, c = cell_step(kind, x_t[None], h, c, *p)
                    hs.append(h[0])
                hs = np.array(hs)
                direction_outputs.append(hs if d == 0 else hs[::-1])
                h_n[k * dirs + d, b] = h[0]
                if c is not None:
                    c_n[k * dirs + d, b] = c[0]
            seq = np.concatenate(direction_outputs, axis=-1)
        out[:lengths[b], b] = seq
    return out, h_n, (c_n if c0 is not None else None)


def numeric_grad(loss, array, eps=1e-6):
    """Central differences of loss() with respect to every entry of array,
    which is perturbed in place and restored."""
    grad = np.zeros(array.shape)
    for idx in np.ndindex(array.shape):
        keep = array[idx]
        array[idx] = keep + eps
        up = loss()
        array[idx] = keep - eps
        down = loss()
        array[idx] = keep
        grad[idx] = (up - down) / (2 * eps)
    return grad


def masked_layer_forward(kind, params, x, h0, c0=None, num_layers=1, bidirectional=False,
                         mask=None, zero_output=False):
    """Keras' masked recurrence, step by step, time-major: x (T, B, D), mask
    (B, T) bool. At a masked step each direction keeps its state and outputs
    its previous output (zeros before any), or zeros with ``zero_output``;
    the reverse direction walks the time axis backwards with the mask.

    Returns out (T, B, dirs * H), h_n, c_n.
    """
    x = np.asarray(x, np.float64)
    T, B, _ = x.shape
    dirs = 2 if bidirectional else 1
    H = h0.shape[-1]
    h_n = np.zeros(h0.shape)
    c_n = np.zeros(h0.shape)
    layer_in = x
    for k in range(num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            p = _params64(params, [n + sfx for n in ("weight_ih", "weight_hh",
                                                     "bias_ih", "bias_hh")],
                          H, GATES[kind])
            h = np.asarray(h0[k * dirs + d], np.float64).copy()
            c = None if c0 is None else np.asarray(c0[k * dirs + d], np.float64).copy()
            prev = np.zeros((B, H))
            out = np.zeros((T, B, H))
            for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
                h_new, c_new = cell_step(kind, layer_in[t], h, c, *p)
                m = mask[:, t][:, None]
                h = np.where(m, h_new, h)
                if c is not None:
                    c = np.where(m, c_new, c)
                prev = np.where(m, h_new, 0.0 if zero_output else prev)
                out[t] = prev
            outs.append(out)
            h_n[k * dirs + d] = h
            if c is not None:
                c_n[k * dirs + d] = c
        layer_in = np.concatenate(outs, axis=-1)
    return layer_in, h_n, (c_n if c0 is not None else None)


# --- learned initial states and DropConnect -----------------------------------------------
def _suffixes(num_layers, bidirectional):
    """The name suffix of every (layer, direction), in the state's row order."""
    return [f"_l{k}" + ("_reverse" if d else "")
            for k in range(num_layers) for d in range(2 if bidirectional else 1)]


def learned_state(params, B, num_layers=1, bidirectional=False, name="initial_h"):
    """The initial state a layer starts from without hx: its parameters
    ``{name}_l{k}[_reverse]`` (H,) repeated for every one of the B rows,
    (layers * dirs, B, H). For a cell (num_layers None): ``{name}`` as (B, H)."""
    if num_layers is None:
        return np.tile(np.asarray(params[name], np.float64), (B, 1))
    rows = [np.asarray(params[name + sfx], np.float64)
            for sfx in _suffixes(num_layers, bidirectional)]
    return np.array([np.tile(row, (B, 1)) for row in rows])


def learned_state_grads(d0, num_layers=1, bidirectional=False, name="initial_h"):
    """The gradients of the learned initial state's parameters from the
    gradient d0 of the initial state, (layers * dirs, B, H): each parameter
    is used by every row, so its gradient is the sum over the rows. For a
    cell (num_layers None) d0 is (B, H)."""
    d0 = np.asarray(d0, np.float64)
    if num_layers is None:
        return {name: d0.sum(axis=0)}
    return {name + sfx: d0[i].sum(axis=0)
            for i, sfx in enumerate(_suffixes(num_layers, bidirectional))}


def bernoulli_mask(rng, shape, p):
    """Inverted dropout's mask: each entry kept (1 / (1 - p)) when a uniform
    draw in [0, 1) is at least p, else dropped (0)."""
    keep = rng.random(shape) >= p
    return np.where(keep, 1.0 / (1.0 - p), 0.0)


def dropconnect_masks(rng, params, num_layers, bidirectional, p):
    """The DropConnect masks of a training forward, drawn from ``rng`` as a
    layer draws them: per layer k one mask for its W_hh of both directions
    stacked (forward's rows first), (dirs * G * H, H). Returns name -> mask
    of each ``weight_hh`` parameter."""
    masks = {}
    for k in range(num_layers):
        names = ["weight_hh" + sfx for sfx in _suffixes(1, bidirectional)]
        names = [n.replace("_l0", f"_l{k}") for n in names]
        stacked = bernoulli_mask(rng, (sum(np.shape(params[n])[0] for n in names),
                                       np.shape(params[names[0]])[1]), p)
        for n, part in zip(names, np.split(stacked, len(names))):
            masks[n] = part
    return masks


def masked_weights(params, masks):
    """params with each masked weight multiplied by its mask (float64)."""
    return {name: (np.asarray(value, np.float64) * masks[name] if name in masks else value)
            for name, value in params.items()}
