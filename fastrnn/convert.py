"""Conversions between fastrnn and other frameworks' recurrent modules.

PyTorch: ``from_torch(module)`` builds the fastrnn layer or cell equivalent
to a ``torch.nn.RNN/GRU/LSTM/RNNCell/GRUCell/LSTMCell`` (configuration and
weights; the names and layouts are the same), ``to_torch(layer)`` the
reverse. torch is imported only when called. Options fastrnn does not
implement are refused by name, never dropped.
"""
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
