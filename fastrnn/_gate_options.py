"""Gate options of the recurrent layers and cells: activations, clip,
input_forget and peepholes (ONNX's LSTM/GRU/RNN attributes; Keras'
activation and recurrent_activation).

Python checks and normalises the user's arguments here; the kernels take
one row of floats per direction (_gates.pxd.tp ``read_options``). A layer
whose options are all at their defaults runs the plain cell kinds, so the
defaults cost nothing; any other value selects the *_OPT kind of the cell.

An activation spec is a name, or a tuple ``(name, alpha)`` or
``(name, alpha, beta)``; for a bidirectional layer also a list of two specs
``[forward, reverse]``.
"""
from __future__ import annotations

import math
import numbers
from collections import namedtuple

import numpy as np

from fastrnn._kernels import forward as _forward

# name: (alpha, beta) defaults, None where the activation takes no parameter.
# ONNX's defaults, except hard_sigmoid: Keras 3's clip(x / 6 + 0.5, 0, 1)
# (ONNX's HardSigmoid defaults to 0.2, 0.5; from_onnx passes its values).
ACTIVATIONS = {
    "sigmoid": None, "tanh": None, "relu": None, "softsign": None, "softplus": None,
    "linear": None,                  # x: affine with 1, 0
    "affine": (1.0, 0.0),            # alpha * x + beta
    "leaky_relu": (0.01, None),      # x if x >= 0 else alpha * x
    "thresholded_relu": (1.0, None), # x if x > alpha else 0
    "scaled_tanh": (1.0, 1.0),       # alpha * tanh(beta * x)
    "hard_sigmoid": (1.0 / 6.0, 0.5),  # min(max(alpha * x + beta, 0), 1)
    "elu": (1.0, None),              # x if x >= 0 else alpha * (e^x - 1)
}

def _is_spec_tuple(value):
    """(name, alpha[, beta]), not a list of per-direction specs: a name, then
    no names or lists (any count, so that a wrong one is told as such). A
    number written as a str ("0.1") is a parameter, refused as one (it was
    taken for a second direction's name)."""
    return (isinstance(value, (tuple, list)) and len(value) >= 1 and isinstance(value[0], str)
            and not any(isinstance(p, (tuple, list)) or (isinstance(p, str) and not _numeric(p))
                        for p in value[1:]))


def _numeric(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def activation(owner, name, spec):
    """The canonical form of one activation spec: the name alone when it has
    its default parameters, else a tuple (name, alpha) or (name, alpha, beta)."""
    names = ", ".join(repr(n) for n in ACTIVATIONS)
    if isinstance(spec, str):
        key, params = spec, ()
    elif _is_spec_tuple(spec):
        key, params = spec[0], tuple(spec[1:])
        if not params:
            raise ValueError(f"{owner}: {name}: a tuple (name, alpha[, beta]) has parameters; "
                             f"give {key!r} alone as a name, got {spec!r}")
    else:
        raise TypeError(f"{owner}: {name} must be an activation name or a tuple (name, alpha"
                        f"[, beta]), got {type(spec).__name__} {spec!r}")
    if key not in ACTIVATIONS:
        raise ValueError(f"{owner}: {name}: unknown activation {key!r}; expected one of "
                         f"{names}")
    defaults = ACTIVATIONS[key]
    takes = 0 if defaults is None else sum(d is not None for d in defaults)
    if len(params) > takes:
        expected = {0: "no parameter", 1: "one parameter (alpha)",
                    2: "at most two parameters (alpha, beta)"}[takes]
        raise ValueError(f"{owner}: {name}: {key!r} takes {expected}, got {len(params)} "
                         f"in {spec!r}")
    values = []
    for label, p in zip(("alpha", "beta"), params):
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"{owner}: {name}: {key!r}'s {label} must be a number, got "
                            f"{type(p).__name__} {p!r}")
        if not math.isfinite(p):
            raise ValueError(f"{owner}: {name}: {key!r}'s {label} must be a finite number, "
                             f"got {p!r}")
        values.append(float(p))
    if defaults is not None:
        full = [values[i] if i < len(values) else d for i, d in enumerate(defaults)
                if d is not None]
        if full == [d for d in defaults if d is not None]:
            return key
        return (key, *full)
    return key


def per_direction(owner, name, spec, dirs):
    """[spec per direction] from one spec or a list of ``dirs`` specs."""
    if isinstance(spec, (list, tuple)) and not _is_spec_tuple(spec):
        if dirs != 2 or len(spec) != 2:
            where = "bidirectional layers" if dirs == 2 else "a unidirectional layer"
            raise ValueError(f"{owner}: {name}: a list of one spec per direction needs "
                             f"2 specs on a bidirectional layer; got {len(spec)} on {where}")
        return [activation(owner, f"{name}[{d}]", s) for d, s in enumerate(spec)]
    return [activation(owner, name, spec)] * dirs


def compact(specs):
    """The config form of per-direction specs: one spec when they agree."""
    specs = [list(s) if isinstance(s, tuple) else s for s in specs]
    return specs[0] if all(s == specs[0] for s in specs) else specs


def _kind(spec):
    """(kernel kind, alpha, beta) of a canonical spec."""
    key, params = (spec, ()) if isinstance(spec, str) else (spec[0], tuple(spec[1:]))
    if key == "linear":
        key, params = "affine", (1.0, 0.0)
    defaults = ACTIVATIONS[key] or ()
    filled = [params[i] if i < len(params) else d
              for i, d in enumerate(d for d in defaults if d is not None)]
    alpha = filled[0] if filled else 0.0
    beta = filled[1] if len(filled) > 1 else 0.0
    return float(_forward.ACTIVATION_KINDS[key]), float(alpha), float(beta)


def check_clip(owner, clip):
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
        raise TypeError(f"{owner}: clip must be None or a number, got {type(clip).__name__} "
                        f"{clip!r}")
    if not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"{owner}: clip must be None or a finite number > 0, got {clip!r}")
    return float(clip)


def option_rows(gate, cand, cell, clip, input_forget):
    """The kernels' (dirs, OPTION_FIELDS) float64 rows from per-direction
    canonical specs (gate or cell None: unused by the cell kind)."""
    rows = []
    for d in range(len(cand)):
        row = []
        for specs in (gate, cand, cell):
            row.extend(_kind("sigmoid" if specs is None else specs[d]))
        row.extend([clip or 0.0, 1.0 if input_forget else 0.0])
        rows.append(row)
    return np.array(rows, np.float64)   # OPTION_FIELDS columns


def check_zoneout(owner, zoneout, is_lstm):
    """(config value, (rate_h, rate_c) or None) of a zoneout argument: a
    probability in [0, 1), or for the LSTM also a pair (h's, c's)."""
    pair = isinstance(zoneout, (tuple, list))
    if pair and not (is_lstm and len(zoneout) == 2):
        raise ValueError(f"{owner}: zoneout must be a probability in [0, 1)"
                         f"{' or a pair (for h, for c)' if is_lstm else ''}, got {zoneout!r}")
    rates = []
    for rate in (zoneout if pair else [zoneout]):
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
            raise TypeError(f"{owner}: zoneout must be a number in [0, 1), got "
                            f"{type(rate).__name__} {rate!r}")
        if not 0 <= rate < 1:
            raise ValueError(f"{owner}: zoneout must be in [0, 1), got {rate!r}")
        rates.append(float(rate))
    if not pair:
        rates = [rates[0], rates[0] if is_lstm else 0.0]
    # a pair of equal rates is the one rate (a scalar sets both): (0, 0) is
    # no zoneout, which to_torch and to_onnx then take
    value = rates if pair and rates[0] != rates[1] else rates[0]
    return value, (tuple(rates) if any(rates) else None)


Configured = namedtuple("Configured", ["kind", "activation", "config", "rows", "zoneout",
                                       "dropouts"])


def configure(owner, base_kind, dirs, *, activation, recurrent_activation=None,
              cell_activation=None, clip=None, input_forget=False, peepholes=False,
              zoneout=0.0, input_dropout=0.0, recurrent_dropout=0.0, is_lstm=False):
    """Check a layer's or cell's gate options (and zoneout, Keras' input and
    recurrent dropout): the cell kind, the candidate's activation, the config
    entries, the option rows or None, the zoneout rates or None, the two
    dropout rates or None. The kind is ``base_kind`` itself when every gate
    option has its default (the plain kernels run), else its *_OPT kind.
    ``recurrent_activation`` None: the cell has no gates (the RNN)."""
    from fastrnn import _validation as v
    if recurrent_activation is None and base_kind != "rnn":   # None would build an RNN
        raise TypeError(f"{owner}: recurrent_activation must be an activation name or a tuple "
                        f"(name, alpha[, beta]), got None")
    cand = per_direction(owner, "activation" if recurrent_activation is not None
                         else "nonlinearity", activation, dirs)
    gate = (None if recurrent_activation is None
            else per_direction(owner, "recurrent_activation", recurrent_activation, dirs))
    cell = None
    config = {}
    if is_lstm:
        cell = cand if cell_activation is None else per_direction(
            owner, "cell_activation", cell_activation, dirs)
        config["cell_activation"] = None if cell_activation is None else compact(cell)
        config["input_forget"] = v.check_bool(owner, "input_forget", input_forget)
        config["peepholes"] = v.check_bool(owner, "peepholes", peepholes)
    clip = check_clip(owner, clip)
    config["clip"] = clip
    config["zoneout"], rates = check_zoneout(owner, zoneout, is_lstm)
    config["input_dropout"] = v.check_dropout(owner, input_dropout, "input_dropout")
    config["recurrent_dropout"] = v.check_dropout(owner, recurrent_dropout, "recurrent_dropout")
    dropouts = (config["input_dropout"], config["recurrent_dropout"])
    if gate is not None:
        config["recurrent_activation"] = compact(gate)
    plain = (clip is None and all(s == "sigmoid" for s in gate or ["sigmoid"])
             and all(s == "tanh" for s in cell or ["tanh"])
             and not config.get("input_forget") and not config.get("peepholes"))
    if recurrent_activation is None:   # the RNN: tanh and relu have plain kinds
        plain = plain and len(set(cand)) == 1 and cand[0] in ("tanh", "relu")
        kind = ("rnn_" + cand[0]) if plain else "rnn_opt"
    else:
        plain = plain and all(s == "tanh" for s in cand)
        kind = base_kind if plain else base_kind + "_opt"
    return Configured(kind, compact(cand), config, None if plain else option_rows(
        gate, cand, cell, clip, config.get("input_forget")), rates,
        dropouts if any(dropouts) else None)


# (config key, default) of every option, in the order repr shows them
DEFAULTS = (("nonlinearity", "tanh"), ("activation", "tanh"),
             ("recurrent_activation", "sigmoid"), ("cell_activation", None), ("clip", None),
             ("input_forget", False), ("peepholes", False), ("zoneout", 0.0),
             ("input_dropout", 0.0), ("recurrent_dropout", 0.0))


def repr_options(config):
    """(key, value) of the options that differ from their defaults."""
    return [(key, config[key]) for key, default in DEFAULTS
            if key in config and config[key] != default]


# the options' entries in the layers' and cells' docstrings
_ZONEOUT_DOC = """
    zoneout : float in [0, 1), default 0
        Keyword only: zoneout (Krueger et al. 2016): in training each unit of
        h keeps its previous value with this probability at each step, in
        inference h_t = zoneout * h_{t-1} + (1 - zoneout) * h~_t."""
_LSTM_ZONEOUT_DOC = """
    zoneout : float in [0, 1) or pair (for h, for c), default 0
        Keyword only: zoneout (Krueger et al. 2016) of h and c: in training
        each unit keeps its previous value with this probability at each step,
        in inference state_t = p * state_{t-1} + (1 - p) * new_t; h~_t =
        o * tanh(c~_t) reads the new cell before its zoneout."""
_DROPOUTS_DOC = """
    input_dropout, recurrent_dropout : float in [0, 1), default 0
        Keyword only: Keras' dropout and recurrent_dropout, in training only:
        one mask per sequence, gate block and direction on the input and on
        h_{t-1} as each gate's product reads them (inverted: kept units scaled
        by 1 / (1 - p)). PyTorch's ``dropout`` (between layers) is apart."""
NONLINEARITY_DOC = """
    nonlinearity : activation, default 'tanh'
        h' = nonlinearity(...): a name ('tanh', 'relu', 'sigmoid', ...) or
        (name, alpha[, beta]), or for a bidirectional layer [forward's,
        reverse's]; see the guide's Gate options.
    clip : float, optional
        Keyword only: the activation's input clamped to [-clip, clip] (ONNX).""" + \
    _ZONEOUT_DOC + _DROPOUTS_DOC
_GATED_DOC = """
    activation : activation, default 'tanh'
        Keyword only: the candidate's ({candidate}): a name ('tanh', 'relu',
        'hard_sigmoid', ...) or (name, alpha[, beta]), or for a bidirectional
        layer [forward's, reverse's]; see the guide's Gate options.
    recurrent_activation : activation, default 'sigmoid'
        Keyword only: the gates' ({gates}), as Keras' argument.
    clip : float, optional
        Keyword only: every gate's and the candidate's input clamped to
        [-clip, clip] (ONNX's clip; c is not clipped)."""
LSTM_DOC = _GATED_DOC.format(candidate="g", gates="i, f, o") + """
    cell_activation : activation, optional
        Keyword only: h = o * cell_activation(c) (ONNX's h); default: activation.
    input_forget : bool, default False
        Keyword only: f = 1 - i (ONNX's input_forget).
    peepholes : bool, default False
        Keyword only: peephole weights ``weight_peephole*`` (3 H,), blocks i, f,
        o: i and f add p * c_{t-1} to their input, o adds p * c_t (ONNX's P).""" + \
    _LSTM_ZONEOUT_DOC + _DROPOUTS_DOC
GRU_DOC = _GATED_DOC.format(candidate="n", gates="r, z") + _ZONEOUT_DOC + _DROPOUTS_DOC

# A cell's forward_train is one step: it draws its dropout masks at each one
# (Keras' cells keep theirs until reset_dropout_mask(); these have no
# sequence to keep them for, and a mask kept over calls would drop the same
# units for the whole training unless reset by hand).
_CELL_DROPOUTS = """input_dropout, recurrent_dropout : float in [0, 1), default 0
        Keyword only: Keras' dropout and recurrent_dropout, in training only:
        fresh masks at every ``forward_train`` (one step: the layers keep one
        mask per sequence), one per gate block, on the input and on h as each
        gate's product reads them (inverted: kept units scaled by
        1 / (1 - p))."""


def _for_cells(doc):
    """A layer's options' docstring entries as a cell's: its dropout masks."""
    layer_entry = _DROPOUTS_DOC.strip()
    if layer_entry not in doc:
        raise AssertionError("the dropouts' entry is missing from the docstring")
    return doc.replace(layer_entry, _CELL_DROPOUTS)


CELL_NONLINEARITY_DOC = _for_cells(NONLINEARITY_DOC)
CELL_LSTM_DOC = _for_cells(LSTM_DOC)
CELL_GRU_DOC = _for_cells(GRU_DOC)
