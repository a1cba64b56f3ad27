"""Conversions between fastrnn and other frameworks' recurrent modules.

PyTorch: ``from_torch(module)`` builds the fastrnn layer or cell equivalent
to a ``torch.nn.RNN/GRU/LSTM/RNNCell/GRUCell/LSTMCell`` (configuration and
weights; the names and layouts are the same), ``to_torch(layer)`` the
reverse. Keras 3: ``from_keras(layer)`` for SimpleRNN, GRU (reset_after=True),
LSTM and Bidirectional. The frameworks are imported only when called.
Options fastrnn does not implement are refused by name, never dropped.
"""
import numpy as np
from fastrnn.cells import GRUCell, LSTMCell, RNNCell
from fastrnn.layers import GRU, LSTM, RNN

_LAYERS = {"RNN": RNN, "GRU": GRU, "LSTM": LSTM}
_CELLS = {"RNNCell": RNNCell, "GRUCell": GRUCell, "LSTMCell": LSTMCell}


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("fastrnn: this conversion needs PyTorch (pip install torch)") from None
    return torch


def _dtype_name(torch, dtype, what):
    names = {torch.float32: "float32", torch.float64: "float64"}
    if dtype not in names:
        raise ValueError(f"from_torch: {what} has dtype {dtype}; fastrnn computes in float32 "
                         f"or float64 (convert the module with .float() or .double())")
    return names[dtype]


def from_torch(module):
    """A fastrnn layer or cell equal to a PyTorch recurrent module.

    Parameters
    ----------
    module : torch.nn.RNN, GRU, LSTM, RNNCell, GRUCell or LSTMCell

    Returns
    -------
    The fastrnn class of the same name, with the same configuration, dtype
    (float32 or float64) and weights, giving the same outputs.
    """
    torch = _torch()
    name = type(module).__name__
    if not isinstance(module, torch.nn.Module) or name not in {**_LAYERS, **_CELLS}:
        raise TypeError(f"from_torch: expected a torch.nn RNN, GRU, LSTM, RNNCell, GRUCell or "
                        f"LSTMCell, got {type(module).__name__}")
    dtype = _dtype_name(torch, next(module.parameters()).dtype, name)
    kwargs = {"bias": bool(module.bias), "dtype": dtype}
    if name in ("RNN", "RNNCell"):
        kwargs["nonlinearity"] = module.nonlinearity
    if name in _LAYERS:
        if getattr(module, "proj_size", 0):
            raise ValueError(f"from_torch: {name} has proj_size={module.proj_size}; fastrnn "
                             f"does not implement LSTM projections")
        kwargs.update(num_layers=module.num_layers, batch_first=bool(module.batch_first),
                      dropout=float(module.dropout), bidirectional=bool(module.bidirectional))
        result = _LAYERS[name](module.input_size, module.hidden_size, **kwargs)
    else:
        result = _CELLS[name](module.input_size, module.hidden_size, **kwargs)
    result.load_state_dict(module.state_dict())
    return result


def to_torch(layer):
    """The PyTorch module equal to a fastrnn layer or cell (same class name,
    configuration, dtype and weights)."""
    torch = _torch()
    name = type(layer).__name__
    if name not in {**_LAYERS, **_CELLS}:
        raise TypeError(f"to_torch: expected a fastrnn RNN, GRU, LSTM or cell, got {name}")
    cfg = dict(layer._config)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.pop("dtype").name]
    size = (cfg.pop("input_size"), cfg.pop("hidden_size"))
    module = getattr(torch.nn, name)(*size, dtype=dtype, **cfg)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    return module


# --- Keras 3 -------------------------------------------------------------------------
def _keras_refuse(layer, name, reason):
    raise ValueError(f"from_keras: {type(layer).__name__} {name}: {reason}")


def _keras_direction(layer, backward=False):
    """(fastrnn class name, weights by PyTorch name without suffix, config) of
    one Keras SimpleRNN / GRU / LSTM layer (``backward``: a Bidirectional's
    reverse half, which Keras runs with go_backwards=True)."""
    kind = type(layer).__name__
    cfg = layer.get_config()
    expected = {"SimpleRNN": {"activation": "tanh"},
                "GRU": {"activation": "tanh", "recurrent_activation": "sigmoid"},
                "LSTM": {"activation": "tanh", "recurrent_activation": "sigmoid"}}[kind]
    for key, value in expected.items():
        if cfg.get(key) != value:
            _keras_refuse(layer, f"{key}={cfg.get(key)!r}", f"fastrnn implements {value!r} "
                          f"only (PyTorch's cell)")
    if bool(cfg.get("go_backwards")) != backward:
        _keras_refuse(layer, f"go_backwards={cfg.get('go_backwards')}", "a reversed layer is "
                      "supported only as a Bidirectional's backward layer")
    for key in ("stateful", "unroll"):
        if cfg.get(key):
            _keras_refuse(layer, f"{key}=True", "not supported; use a fastrnn Stream for state")
    if cfg.get("dropout") or cfg.get("recurrent_dropout"):
        _keras_refuse(layer, "dropout / recurrent_dropout", "Keras' per-step input and "
                      "recurrent dropout differ from fastrnn's between-layer dropout")
    if kind == "GRU" and not cfg.get("reset_after", True):
        _keras_refuse(layer, "reset_after=False", "the 'reset before' GRU is not implemented "
                      "yet (fastrnn's GRU is PyTorch's, Keras' reset_after=True)")
    weights = layer.get_weights()
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if cfg.get("use_bias", True) else None
    units = recurrent.shape[0]

    def reorder(a):  # Keras' GRU gates z, r, h -> PyTorch's r, z, n (axis 0 after .T)
        if kind != "GRU":
            return a
        z, r, n = np.split(a, 3, axis=0)
        return np.concatenate([r, z, n], axis=0)

    params = {"weight_ih": reorder(kernel.T), "weight_hh": reorder(recurrent.T)}
    if bias is not None:
        if kind == "GRU":  # (2, 3U): input and recurrent biases
            params["bias_ih"], params["bias_hh"] = reorder(bias[0]), reorder(bias[1])
        else:              # one bias: PyTorch's two summed
            params["bias_ih"], params["bias_hh"] = bias, np.zeros_like(bias)
    name = {"SimpleRNN": "RNN", "GRU": "GRU", "LSTM": "LSTM"}[kind]
    return name, params, {"input_size": kernel.shape[0], "hidden_size": units,
                          "bias": bias is not None, "return_sequences": cfg["return_sequences"]}


def from_keras(layer, dtype="float32"):
    """A fastrnn layer equal to a Keras 3 SimpleRNN, GRU (reset_after=True),
    LSTM, or Bidirectional(merge_mode='concat') of one of them.

    The result is batch-first, as Keras is. A Keras layer with
    ``return_sequences=False`` returns the last step: follow the fastrnn
    layer with ``fastrnn.LastStep()`` (``LastStep(bidirectional=True)`` for a
    Bidirectional), as fastrnn layers always return the whole sequence.
    """
    kind = type(layer).__name__
    if kind == "Bidirectional":
        if layer.merge_mode != "concat":
            _keras_refuse(layer, f"merge_mode={layer.merge_mode!r}", "fastrnn concatenates "
                          "the directions ('concat')")
        fwd = _keras_direction(layer.forward_layer)
        bwd = _keras_direction(layer.backward_layer, backward=True)
        if (fwd[0], fwd[2]) != (bwd[0], bwd[2]):
            _keras_refuse(layer, "backward_layer", "must be the same kind and size as the "
                          "forward layer")
        parts = [("", fwd[1]), ("_reverse", bwd[1])]
        name, config = fwd[0], fwd[2]
    elif kind in ("SimpleRNN", "GRU", "LSTM"):
        name, params, config = _keras_direction(layer)
        parts = [("", params)]
    else:
        raise TypeError(f"from_keras: expected a Keras SimpleRNN, GRU, LSTM or Bidirectional, "
                        f"got {kind}")
    result = _LAYERS[name](config["input_size"], config["hidden_size"], bias=config["bias"],
                           batch_first=True, bidirectional=kind == "Bidirectional",
                           dtype=dtype)
    result.load_state_dict({f"{key}_l0{sfx}": value for sfx, params in parts
                            for key, value in params.items()})
    return result
