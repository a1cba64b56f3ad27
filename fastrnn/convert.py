"""Conversions between fastrnn and other frameworks' recurrent modules.

PyTorch: ``from_torch(module)`` builds the fastrnn layer or cell equivalent
to a ``torch.nn.RNN/GRU/LSTM/RNNCell/GRUCell/LSTMCell`` (configuration and
weights; the names and layouts are the same), ``to_torch(layer)`` the
reverse. Keras 3: ``from_keras(layer)`` for SimpleRNN, GRU (either
reset_after), LSTM and Bidirectional (any merge_mode; go_backwards, stateful
and masks kept, see fastrnn.wrappers and fastrnn.masking), and keras.Sequential
models of them with Masking, Embedding, Dense and Dropout (or functional
keras.Model chains of the same layers). ONNX: ``to_onnx`` /
``from_onnx`` (forward, reverse and bidirectional nodes, layout 0 or 1). The
frameworks are imported only when called. Options fastrnn does not implement
are refused by name, never dropped.
"""
from __future__ import annotations

import math
import numbers
import os
import stat
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import DTypeLike

from fastrnn import _gate_options, _training_options
from fastrnn import _validation as v
from fastrnn._validation import check_dtype, shape_str
from fastrnn.cells import GRUCell, LSTMCell, RNNCell
from fastrnn.layers import GRU, LSTM, RNN
from fastrnn.wrappers import Reversed, Stateful

if TYPE_CHECKING:
    from fastrnn.model import Sequential

_LAYERS = {"RNN": RNN, "GRU": GRU, "LSTM": LSTM}
_CELLS = {"RNNCell": RNNCell, "GRUCell": GRUCell, "LSTMCell": LSTMCell}


def _class_name(owner, layer, classes, what):
    """The name of ``layer``'s class, one of ``classes`` (name -> fastrnn
    class), else a TypeError (a PyTorch module of the same name included)."""
    from fastrnn.quantized import QUANTIZED_CLASSES   # (it imports the layers, as this does)
    name = type(layer).__name__
    if isinstance(layer, QUANTIZED_CLASSES):
        # the float class it was made from, where this conversion takes that
        float_name = next((base.__name__ for base in type(layer).__mro__[1:]
                           if classes.get(base.__name__) is base), None)
        weights = layer._config["weight_dtype"]
        if float_name is None:
            raise TypeError(f"{owner}: expected a fastrnn {what}, got {v.qualified_name(layer)} "
                            f"({weights})")
        raise TypeError(f"{owner}: the {name} is quantized ({weights}); {owner} converts "
                        f"float models only: convert the float32 {float_name}")
    if not isinstance(layer, classes.get(name, ())):
        raise TypeError(f"{owner}: expected a fastrnn {what}, got {v.qualified_name(layer)}")
    return name


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


def _refuse_torch_hooks(torch, module):
    """A forward hook or pre-hook, the module's or every module's
    (register_module_forward_hook), changes what the module computes (its
    output, its input) where fastrnn cannot see it: refused by name, never
    dropped. (Backward hooks change no output; state-dict hooks are passed
    by: the weights are read from the parameters.)"""
    everyone = torch.nn.modules.module
    for attr, what in (("_forward_pre_hooks", "forward pre-hook"),
                       ("_forward_hooks", "forward hook")):
        hooks, whose = getattr(module, attr, None), type(module).__name__
        if not hooks:
            hooks, whose = getattr(everyone, "_global" + attr, None), "every module (global)"
        if hooks:
            hook = next(iter(hooks.values()))
            raise ValueError(f"from_torch: {whose} has a {what} "
                             f"({getattr(hook, '__qualname__', type(hook).__name__)}), which "
                             f"changes what it computes and does not convert; remove it "
                             f"(the handle's remove()) and apply it to the converted layer's "
                             f"input or output")


def from_torch(module: Any) -> RNN | GRU | LSTM | RNNCell | GRUCell | LSTMCell:
    """A fastrnn layer or cell equal to a PyTorch recurrent module.

    Parameters
    ----------
    module : torch.nn.RNN, GRU, LSTM, RNNCell, GRUCell or LSTMCell
        or one of torch.ao.nn.quantized.dynamic's LSTM, GRU, RNNCell,
        GRUCell, LSTMCell or Linear (made by
        ``torch.ao.quantization.quantize_dynamic`` with ``dtype=torch.qint8``)

    Returns
    -------
    RNN, GRU, LSTM, RNNCell, GRUCell or LSTMCell
        The fastrnn class of the same name, with the same configuration,
        dtype (float32 or float64) and weights, giving the same outputs.
        For a dynamically quantized module, the quantized fastrnn class
        (``QuantizedLSTM``, ...) with PyTorch's int8 weights and scales; see
        ``fastrnn.quantized.from_torch_dynamic`` for what differs.
    """
    torch = _torch()
    from fastrnn import quantized
    if isinstance(module, torch.nn.Module):
        _refuse_torch_hooks(torch, module)
    if isinstance(module, torch.nn.Module) and quantized.is_torch_dynamic(module):
        return quantized.from_torch_dynamic(module)   # quantize_dynamic's int8 modules
    # the torch.nn class it is (or derives from; torch.ao.nn's quantizable
    # and static quantized LSTM only bear the name)
    bases = [getattr(torch.nn, n) for n in {**_LAYERS, **_CELLS}]
    base = next((c for c in type(module).__mro__ if any(c is b for b in bases)), None)
    if base is None:
        raise TypeError(f"from_torch: expected a torch.nn RNN, GRU, LSTM, RNNCell, GRUCell or "
                        f"LSTMCell, got {v.qualified_name(module)}")
    name = base.__name__
    # what a call runs: a subclass that redefines any of it computes its own way
    for method in ("__call__", "_call_impl", "forward", "permute_hidden", "check_forward_args",
                   "check_input", "check_hidden_size", "get_expected_hidden_size"):
        # (or replaces it on the instance: a monkey patch, accelerate's hooks)
        if getattr(type(module), method, None) is not getattr(base, method, None) \
                or method in vars(module):
            how = "replaces on the instance" if method in vars(module) else "overrides"
            raise TypeError(f"from_torch: {v.qualified_name(module)} {how} torch.nn.{name}."
                            f"{method}; only torch's own computation converts (its weights "
                            f"can: build a torch.nn.{name} and load its state_dict)")
    dtypes = {p.dtype for p in module.parameters()}
    if len(dtypes) > 1:
        kinds = ", ".join(f"{n} {p.dtype}" for n, p in module.named_parameters())
        raise ValueError(f"from_torch: {name}'s parameters are of several dtypes ({kinds}); "
                         f"torch itself cannot run it: give them one with .float() or "
                         f".double()")
    dtype = _dtype_name(torch, dtypes.pop(), name)
    kwargs = {"bias": bool(module.bias), "dtype": dtype}
    if name == "RNN":   # its forward reads mode (set at construction), not nonlinearity
        modes = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}
        if module.mode not in modes:
            raise ValueError(f"from_torch: RNN has mode={module.mode!r}; expected 'RNN_TANH' or "
                             f"'RNN_RELU'")
        kwargs["nonlinearity"] = modes[module.mode]
    elif name == "RNNCell":   # (its forward raises for any other)
        if module.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"from_torch: RNNCell has nonlinearity={module.nonlinearity!r}; "
                             f"expected 'tanh' or 'relu'")
        kwargs["nonlinearity"] = module.nonlinearity
    if name in _LAYERS:
        kwargs.update(num_layers=module.num_layers, batch_first=bool(module.batch_first),
                      dropout=float(module.dropout), bidirectional=bool(module.bidirectional))
        if name == "LSTM":
            kwargs["proj_size"] = int(module.proj_size)
    try:
        result = {**_LAYERS, **_CELLS}[name](module.input_size, module.hidden_size, **kwargs)
    except (TypeError, ValueError) as exc:   # e.g. dropout=1.0, which torch takes
        raise type(exc)(f"from_torch: {name} does not convert: {exc}") from None
    # the parameters themselves, not state_dict(), which a state-dict hook may change
    params = dict(module.named_parameters())
    expected = set(result.state_dict())
    if set(params) != expected:
        extra, missing = sorted(set(params) - expected), sorted(expected - set(params))
        raise ValueError(f"from_torch: {name} holds the parameters {extra} in place of "
                         f"{missing} (a parametrization, weight_norm or pruning: remove it "
                         f"first, e.g. torch.nn.utils.parametrize.remove_parametrizations)"
                         if missing else f"from_torch: {name} holds parameters torch.nn."
                         f"{name} has not: {extra}")
    result.load_state_dict({key: value.detach() for key, value in params.items()})
    return result


def torch_refusal(layer: RNN | GRU | LSTM | RNNCell | GRUCell | LSTMCell) -> str | None:
    """Why PyTorch's module of the same class cannot compute a fastrnn layer
    or cell (an option it lacks, named), or None if it can."""
    name = type(layer).__name__
    cfg = layer._config
    if cfg.get("layer_norm"):
        return f"{name} has layer_norm=True; PyTorch's {name} has no layer normalisation"
    if not cfg.get("reset_after", True):
        return f"{name} has reset_after=False; PyTorch has only the reset-after GRU"
    for key, value in _gate_options.repr_options(cfg):
        # (an LSTM's cell_activation given as its activation is the default's)
        if key == "cell_activation" and value == cfg.get("activation", "tanh"):
            continue
        if key != "nonlinearity" or value not in ("tanh", "relu"):
            return f"{name} has {key}={value!r}; PyTorch has no such option"
    # the training options PyTorch lacks (it would neither learn the initial
    # state nor drop weights in training)
    for key, value in _training_options.repr_options(cfg)[:1]:
        return f"{name} has {key}={value!r}; PyTorch has no such option"
    return None


def to_torch(layer: RNN | GRU | LSTM | RNNCell | GRUCell | LSTMCell) -> Any:
    """The PyTorch module equal to a fastrnn layer or cell (same class name,
    configuration, dtype and weights), in eval mode, as fastrnn's calls
    are: a stacked layer's ``dropout`` applies in torch's training mode
    only (call ``.train()`` on it to train there)."""
    name = _class_name("to_torch", layer, {**_LAYERS, **_CELLS}, "RNN, GRU, LSTM or cell")
    refusal = torch_refusal(layer)
    if refusal is not None:
        # where to_onnx takes the layer, the refusals point at it
        hint = ""
        if name in _LAYERS and not layer._config.get("zoneout") \
                and not layer._config.get("proj_size") and "layer_norm" not in refusal:
            hint = (" (export it for inference with to_onnx instead)"
                    if _training_options.repr_options(layer._config)
                    else " (export it with to_onnx instead)")
        raise ValueError(f"to_torch: {refusal}{hint}")
    torch = _torch()
    cfg = dict(layer._config)
    for key, _ in (*_gate_options.DEFAULTS, *_training_options.DEFAULTS):
        if key != "nonlinearity":
            cfg.pop(key, None)
    cfg.pop("layer_norm", None)
    cfg.pop("reset_after", None)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.pop("dtype").name]
    size = (cfg.pop("input_size"), cfg.pop("hidden_size"))
    module = getattr(torch.nn, name)(*size, dtype=dtype, **cfg)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    return module.eval()


# --- Keras (3; Keras 2's tf_keras layers too) ------------------------------------------
# Keras' activations that fastrnn's gate options compute (Keras 3's
# hard_sigmoid is fastrnn's default one; its leaky_relu's slope is 0.2)
_KERAS_ACTIVATIONS = {"tanh": "tanh", "sigmoid": "sigmoid", "relu": "relu", "linear": "linear",
                      "hard_sigmoid": "hard_sigmoid", "softsign": "softsign",
                      "softplus": "softplus", "elu": "elu", "leaky_relu": ("leaky_relu", 0.2)}


def _keras_refuse(layer, name, reason):
    raise ValueError(f"from_keras: {type(layer).__name__} {name}: {reason}")


_KERAS_ROOTS = ("keras", "tf_keras", "tensorflow")
# the Keras classes fastrnn converts, known by their names
_KERAS_CONVERTED = {"SimpleRNN", "GRU", "LSTM", "Bidirectional", "Sequential", "Functional",
                    "InputLayer", "Masking", "Embedding", "Dense", "Dropout"}


def _keras_root(cls):
    return cls.__module__.partition(".")[0]


def _keras_kind(layer):
    """The Keras class name a layer converts by, once it (and an RNN
    layer's cell) is Keras' own class: a subclass, even one keeping the
    name, may compute its own way (a GRU whose call doubles its input had
    converted as a plain GRU). A name fastrnn does not convert comes back
    as it is, for the caller to refuse by it."""
    kind = type(layer).__name__
    if kind not in _KERAS_CONVERTED:
        return kind
    cell = getattr(layer, "cell", None) if kind in ("SimpleRNN", "GRU", "LSTM") else None
    for obj in (layer, cell):
        if obj is not None and _keras_root(type(obj)) not in _KERAS_ROOTS:
            base = next((c for c in type(obj).__mro__ if _keras_root(c) in _KERAS_ROOTS),
                        object)
            raise TypeError(f"from_keras: {v.qualified_name(obj)} subclasses Keras' "
                            f"{base.__name__}; only Keras' own classes convert (their weights "
                            f"can: build Keras' {base.__name__} and set its weights)")
    return kind


def _keras2(layer):
    """Whether a layer is Keras 2's (tf_keras, TensorFlow's own keras before
    2.16, or the keras package 2.x), whose hard_sigmoid differs."""
    root = _keras_root(type(layer))
    if root != "keras":
        return True
    import keras
    return str(getattr(keras, "__version__", "3")).startswith("2.")


def _keras_plain_weights(layer):
    """Refuse a layer whose weights are not the plain float ones get_weights'
    positions give (what fastrnn reads): Keras' LoRA adds lora_a @ lora_b to
    the kernel, its quantized layers hold int8 values with scales."""
    if getattr(layer, "lora_enabled", False):
        _keras_refuse(layer, "lora_enabled=True", "fastrnn reads the base kernel only, which "
                      "would drop the LoRA update: convert the model before enable_lora, or "
                      "fold the update into the kernel first")
    mode = getattr(getattr(layer, "dtype_policy", None), "quantization_mode", None)
    if mode is not None:
        _keras_refuse(layer, f"quantization_mode={mode!r}", "fastrnn reads float weights; "
                      "convert the float model (fastrnn.quantize quantizes the result)")


def _keras_precision(layer, dtype):
    """Warn where Keras computes a layer in a lower precision than the
    converted one will (a mixed-precision policy's float16 or bfloat16, or
    float64 converted to float32): the same weights, other numbers. A
    Bidirectional's own layers may have a policy of their own."""
    for part in (layer, getattr(layer, "forward_layer", None),
                 getattr(layer, "backward_layer", None)):
        computes = str(getattr(part, "compute_dtype", None) or "float32")
        if part is not None and computes in ("float16", "bfloat16", "float64") \
                and computes != dtype.name:
            layer = part
            break
    else:
        return
    policy = getattr(getattr(layer, "dtype_policy", None), "name", computes)
    if computes == "float64":
        how = "pass dtype='float64' to compute as it does"
    else:
        how = (f"fastrnn has no {computes} arithmetic, so the outputs differ from Keras' by "
               f"{computes} rounding (about 1e-3 of their size)")
    warnings.warn(f"from_keras: {type(layer).__name__} {layer.name!r} computes in {computes} "
                  f"in Keras (dtype policy {policy!r}); the converted layer computes in "
                  f"{dtype.name} from the same weights: {how}", stacklevel=3)


def _keras_direction(layer, backward=False):
    """(fastrnn class name, weights by PyTorch name without suffix, config) of
    one Keras SimpleRNN / GRU / LSTM layer (``backward``: a Bidirectional's
    reverse half, which Keras runs with go_backwards=True; otherwise
    go_backwards is kept in the config, for a Reversed wrapper)."""
    kind = _keras_kind(layer)
    if kind not in ("SimpleRNN", "GRU", "LSTM"):
        raise TypeError(f"from_keras: expected a Keras SimpleRNN, GRU or LSTM inside, got {kind}")
    cfg = layer.get_config()
    if cfg.get("time_major"):   # (Keras 2: inputs (T, B, D); fastrnn reads (B, T, D))
        _keras_refuse(layer, "time_major=True", "fastrnn converts batch-major Keras layers "
                      "(Keras 3 has no time_major): convert the layer built with "
                      "time_major=False, and give the result x.transpose(1, 0, 2)")
    options = {}
    for key in ("activation",) if kind == "SimpleRNN" else ("activation",
                                                            "recurrent_activation"):
        value = cfg.get(key)
        if not isinstance(value, str) or value not in _KERAS_ACTIVATIONS:
            _keras_refuse(layer, f"{key}={value!r}", f"fastrnn implements Keras' "
                          f"{', '.join(sorted(_KERAS_ACTIVATIONS))}")
        spec = _KERAS_ACTIVATIONS[value]
        if value == "hard_sigmoid" and _keras2(layer):   # Keras 2's: clip(0.2 x + 0.5)
            spec = ("hard_sigmoid", 0.2, 0.5)
        options["nonlinearity" if kind == "SimpleRNN" else key] = spec
    if backward and not cfg.get("go_backwards"):
        _keras_refuse(layer, "go_backwards=False", "a Bidirectional's backward layer must run "
                      "backwards")
    if cfg.get("unroll"):
        _keras_refuse(layer, "unroll=True", "not supported (it changes nothing in the "
                      "numbers: build the layer with unroll=False)")
    if cfg.get("return_state"):
        _keras_refuse(layer, "return_state=True", "the converted layer would return its "
                      "output only, where Keras returns the states too: convert it with "
                      "return_state=False (a fastrnn layer's call returns (output, state))")
    _keras_plain_weights(layer)
    # Keras' per-gate, per-sequence masks (its implementation 1) are fastrnn's
    # input_dropout and recurrent_dropout (its dropout acts between layers)
    for key, name in (("dropout", "input_dropout"), ("recurrent_dropout", "recurrent_dropout")):
        if cfg.get(key):
            options[name] = float(cfg[key])
    weights = layer.get_weights()
    if len(weights) < 2:
        _keras_refuse(layer, "weights", "the layer is not built yet (it has no weights): "
                      "call it once, or build it, before converting")
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if cfg.get("use_bias", True) else None
    units = recurrent.shape[0]

    def reorder(a):  # Keras' GRU gates z, r, h -> PyTorch's r, z, n (axis 0 after .T)
        if kind != "GRU":
            return a
        z, r, n = np.split(a, 3, axis=0)
        return np.concatenate([r, z, n], axis=0)

    params = {"weight_ih": reorder(kernel.T), "weight_hh": reorder(recurrent.T)}
    reset_after = kind != "GRU" or bool(cfg.get("reset_after", True))
    if bias is not None:
        if kind == "GRU" and reset_after:  # (2, 3U): input and recurrent biases
            params["bias_ih"], params["bias_hh"] = reorder(bias[0]), reorder(bias[1])
        else:              # one bias: PyTorch's two summed
            params["bias_ih"], params["bias_hh"] = reorder(bias), np.zeros_like(bias)
    name = {"SimpleRNN": "RNN", "GRU": "GRU", "LSTM": "LSTM"}[kind]
    config = {"input_size": kernel.shape[0], "hidden_size": units, "bias": bias is not None,
              "return_sequences": cfg["return_sequences"],
              "go_backwards": bool(cfg.get("go_backwards")),
              "stateful": bool(cfg.get("stateful")),
              "zero_output_for_mask": bool(getattr(layer, "zero_output_for_mask", False))}
    if kind == "GRU":
        config["reset_after"] = reset_after
    config["options"] = options
    return name, params, config


def _keras_stateful_batch(layer):
    """The batch size a stateful Keras layer was built for (its states'
    first dimension), or None where Keras does not know it yet."""
    inner = layer.forward_layer if type(layer).__name__ == "Bidirectional" else layer
    states = getattr(inner, "states", None) or []
    size = states[0].shape[0] if states and len(states[0].shape) == 2 else None
    return int(size) if size is not None else None


def from_keras(layer: Any, dtype: DTypeLike = "float32") -> Any:
    """A fastrnn layer or model equal to a Keras 3 recurrent layer or model
    (Keras 2's tf_keras layers too, with Keras 2's hard_sigmoid). Keras'
    own classes only: a subclass, even one keeping the name, may compute
    its own way and is refused, as is Keras 2's ``time_major=True``.

    Parameters
    ----------
    layer : Keras SimpleRNN, GRU, LSTM, Bidirectional, keras.Sequential or keras.Model
        A SimpleRNN, GRU (``reset_after`` True or False, kept) or LSTM
        (``activation`` and ``recurrent_activation`` tanh, sigmoid, relu,
        linear, hard_sigmoid, softsign, softplus, elu or leaky_relu), alone
        or in a ``Bidirectional`` (any ``merge_mode``); ``go_backwards`` and ``stateful`` are kept. A
        ``keras.Sequential`` may also hold ``Masking``, ``Embedding``
        (``mask_zero`` kept), ``Dense`` (linear, relu, tanh or sigmoid) and
        ``Dropout`` layers. A functional ``keras.Model`` imports as that
        keras.Sequential would if its layers form one chain: one input, one
        output, each layer called once on the previous one's output alone
        (no branches, shared layers, extra inputs such as ``mask=`` or
        ``initial_state=``, keyword arguments or several outputs such as
        ``return_state``); anything else is refused, naming the layer. So
        are weights fastrnn would misread and outputs it would drop: a
        layer with ``return_state=True``, LoRA enabled (``enable_lora``) or
        quantized by Keras (``model.quantize``), and a Bidirectional whose
        two layers have different dropout rates.
    dtype : {'float32', 'float64'}, default 'float32'

    Returns
    -------
    RNN, GRU, LSTM, Reversed, Stateful or Sequential
        Batch-first, as Keras is, computing what Keras computes, masks
        included:

        - ``return_sequences=True``, ``merge_mode="concat"``: the layer itself.
        - ``go_backwards=True``: ``Reversed(layer, keep_order=False)`` (Keras
          returns the sequence in the order it ran: reversed).
        - ``stateful=True``: ``Stateful(...)`` of that; its carried state
          starts at zeros (``reset_state``), its batch size is Keras' (the
          one the layer was built for: a call with another is refused, where
          it would have carried other rows' states), or fixed by the first
          call if Keras has none yet.
        - otherwise a ``Sequential`` of that followed by ``ZeroMasked()``
          (``zero_output_for_mask=True``; ``reverse=True`` after
          ``go_backwards``), ``LastStep`` (for
          ``return_sequences=False``) and ``MergeDirections(merge_mode)``
          (merge modes "sum", "mul", "ave" and None, which stacks the two
          directions on a new axis (..., 2, H) where Keras returns a list).

        ``Bidirectional`` with ``return_sequences=True`` zeros the masked
        steps (Keras forces ``zero_output_for_mask``): a converted
        keras.Sequential holds the ``ZeroMasked`` for it; when calling the
        returned bidirectional layer yourself with a mask, pass
        ``zero_output_for_mask=True``.
    """
    kind = type(layer).__name__
    if not any(_keras_root(cls) in _KERAS_ROOTS for cls in type(layer).__mro__):   # (a torch or fastrnn LSTM has no get_config)
        hint = ("; for a PyTorch module use fastrnn.from_torch"
                if type(layer).__module__.startswith("torch") else "")
        raise TypeError(f"from_keras: expected a Keras SimpleRNN, GRU, LSTM, Bidirectional, "
                        f"Sequential or functional Model, got {type(layer).__module__}.{kind} "
                        f"(not a Keras object){hint}")
    kind = _keras_kind(layer)
    dtype = check_dtype("from_keras", dtype)   # named here, not by the layer built from it
    if kind not in ("Sequential", "Functional"):   # (a model's: each layer's, as it converts)
        _keras_precision(layer, dtype)
    if kind == "Sequential":
        return _keras_model(layer.layers, dtype)
    if kind == "Functional":
        return _keras_model(_keras_chain(layer), dtype)
    if kind == "Bidirectional":
        if layer.merge_mode not in ("concat", "sum", "mul", "ave", None):
            _keras_refuse(layer, f"merge_mode={layer.merge_mode!r}", "expected 'concat', "
                          "'sum', 'mul', 'ave' or None")
        fwd = _keras_direction(layer.forward_layer)
        bwd = _keras_direction(layer.backward_layer, backward=True)
        if fwd[1].keys() != bwd[1].keys() or fwd[0] != bwd[0] or any(
                fwd[2][k] != bwd[2][k] for k in ("input_size", "hidden_size", "bias",
                                                  "return_sequences", "reset_after")
                if k in fwd[2]):
            _keras_refuse(layer, "backward_layer", "must be the same kind and size as the "
                          "forward layer")
        if fwd[2]["go_backwards"]:
            _keras_refuse(layer, "forward_layer go_backwards=True", "fastrnn's forward "
                          "direction reads the sequence forwards")
        parts = [("", fwd[1]), ("_reverse", bwd[1])]
        name, config = fwd[0], fwd[2]
        # (each direction's activations; Keras lets the backward layer differ)
        fwd_options, bwd_options = fwd[2]["options"], bwd[2]["options"]
        gate_options = {key: value if value == bwd_options[key] else [value, bwd_options[key]]
                        for key, value in fwd_options.items() if "dropout" not in key}
        for key in ("input_dropout", "recurrent_dropout"):   # one rate for both directions
            rate = fwd_options.get(key, 0.0)
            if rate != bwd_options.get(key, 0.0):
                keras_key = "dropout" if key == "input_dropout" else key
                _keras_refuse(layer, f"backward_layer {keras_key}="
                              f"{bwd_options.get(key, 0.0)!r}", f"differs from the forward "
                              f"layer's {rate!r}; fastrnn's bidirectional layer takes one rate")
            if rate:
                gate_options[key] = rate
    elif kind in ("SimpleRNN", "GRU", "LSTM"):
        name, params, config = _keras_direction(layer)
        parts = [("", params)]
        gate_options = config["options"]
    else:
        raise TypeError(f"from_keras: expected a Keras SimpleRNN, GRU, LSTM, Bidirectional, "
                        f"Sequential or functional Model, got {kind}")
    bidirectional = kind == "Bidirectional"
    options = {"reset_after": config["reset_after"]} if name == "GRU" else {}
    result = _LAYERS[name](config["input_size"], config["hidden_size"], bias=config["bias"],
                           batch_first=True, bidirectional=bidirectional,
                           dtype=dtype, **options, **gate_options)
    result.load_state_dict({f"{key}_l0{sfx}": value for sfx, params in parts
                            for key, value in params.items()})
    if config["go_backwards"]:
        result = Reversed(result, keep_order=False)
    if config["stateful"]:
        result = Stateful(result, batch_size=_keras_stateful_batch(layer))
    from fastrnn.nn import LastStep, MergeDirections, ZeroMasked
    after = []
    # Keras' Bidirectional forces zero_output_for_mask = return_sequences
    if config["return_sequences"] if bidirectional else config["zero_output_for_mask"]:
        # a go_backwards layer's output is reversed, the mask Keras passes on is not
        after.append(ZeroMasked(reverse=bool(config["go_backwards"])))
    if not config["return_sequences"]:
        after.append(LastStep(bidirectional=bidirectional))
    if bidirectional and layer.merge_mode != "concat":
        after.append(MergeDirections(layer.merge_mode))
    if after == [] or (bidirectional and len(after) == 1 and layer.merge_mode == "concat"
                       and config["return_sequences"]):
        return result   # the layer itself (with a mask, call it with zero_output_for_mask)
    from fastrnn.model import Sequential
    return Sequential([result, *after])


def _keras_chain(model):
    """The layers of a functional keras.Model, input to output, once they
    form one chain (see from_keras); anything else refused by name."""
    where = f"from_keras: functional model {model.name!r}"
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        counts = [f"{len(items)} {word}" + ("" if len(items) == 1 else "s")
                  for items, word in ((model.inputs, "input"), (model.outputs, "output"))]
        raise ValueError(f"{where} has {counts[0]} and {counts[1]}; fastrnn imports a chain "
                         f"of layers from one input to one output")
    source, tensor = model.inputs[0], model.outputs[0]
    chain = []
    while tensor is not source:
        op, node_index, _ = tensor._keras_history
        node = op._inbound_nodes[node_index]
        what = f"{where}: {type(op).__name__} layer {op.name!r}"
        if not hasattr(op, "get_weights"):   # a keras.ops operation, not a layer
            raise ValueError(f"{where}: {type(op).__name__} operation {op.name!r} (keras.ops "
                             f"or an operator on a tensor) is not a layer; fastrnn imports "
                             f"a chain of Masking, Embedding, Dense, Dropout, SimpleRNN, GRU, "
                             f"LSTM and Bidirectional layers")
        if len(node.outputs) != 1:
            raise ValueError(f"{what} gives {len(node.outputs)} tensors (return_state?); "
                             f"fastrnn imports layers giving one")
        args, kwargs = node.arguments.args, node.arguments.kwargs
        # Keras records the call's context: training (False unless forced) and
        # the mask propagated from the input (which the import propagates too)
        propagated = getattr(args[0], "_keras_mask", None) if args else None
        passed = sorted(key for key, value in kwargs.items()
                        if value is not None and not (key == "training" and value is False)
                        and not (key == "mask" and value is propagated))
        if len(args) != 1 or not hasattr(args[0], "_keras_history") or passed:
            got = f"keyword arguments {passed}" if passed else \
                f"{len(node.input_tensors)} input tensors"
            raise ValueError(f"{what} is called with {got}; fastrnn imports a chain of layers "
                             f"each called on the previous one's output alone")
        if any(op is seen for seen in chain):
            raise ValueError(f"{what} is called more than once (shared weights); fastrnn "
                             f"imports each layer once")
        chain.append(op)
        tensor = args[0]
    # (model.layers leaves out the operations computing the propagated masks)
    layers = [op for op in model.layers if type(op).__name__ != "InputLayer"]
    if len(layers) != len(chain):
        off = [op.name for op in layers if not any(op is seen for seen in chain)]
        raise ValueError(f"{where}: the layers {off} are off the chain from its input to its "
                         f"output")
    return chain[::-1]


def _keras_model(keras_layers, dtype):
    """A fastrnn Sequential of a keras.Sequential's layers, or of a
    functional model's chain (see from_keras)."""
    from fastrnn.model import Sequential
    from fastrnn.nn import Dropout, Embedding, Linear, Masking, ReLU, Sigmoid, Tanh, ZeroMasked
    activations = {"linear": None, "relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}
    layers = []
    for sub in keras_layers:
        kind = _keras_kind(sub)
        if kind == "InputLayer":
            continue
        if kind == "Masking":
            layers.append(Masking(float(sub.mask_value)))
        elif kind == "Embedding":
            _keras_plain_weights(sub)
            _keras_precision(sub, dtype)
            table = sub.get_weights()[0]
            emb = Embedding(table.shape[0], table.shape[1], mask_zero=bool(sub.mask_zero),
                            dtype=dtype)
            emb.load_state_dict({"weight": table})
            layers.append(emb)
        elif kind == "Dense":
            cfg = sub.get_config()
            act = cfg.get("activation")
            if act not in activations:
                _keras_refuse(sub, f"activation={act!r}", f"expected one of "
                              f"{sorted(activations)}")
            _keras_plain_weights(sub)
            _keras_precision(sub, dtype)
            weights = sub.get_weights()
            dense = Linear(weights[0].shape[0], weights[0].shape[1],
                           bias=bool(cfg.get("use_bias", True)), dtype=dtype)
            dense.load_state_dict({"weight": weights[0].T, **({"bias": weights[1]}
                                                             if len(weights) > 1 else {})})
            layers.append(dense)
            if activations[act] is not None:
                layers.append(activations[act]())
        elif kind == "Dropout":
            layers.append(Dropout(float(sub.rate)))
        elif kind in ("SimpleRNN", "GRU", "LSTM", "Bidirectional"):
            converted = from_keras(sub, dtype)
            parts = list(converted.layers) if isinstance(converted, Sequential) \
                else [converted]
            if kind == "Bidirectional" and sub.return_sequences \
                    and not isinstance(converted, Sequential):
                parts.append(ZeroMasked())    # Keras forces zero_output_for_mask
            layers.extend(parts)
        else:
            raise TypeError(f"from_keras: {kind} layer {sub.name!r}: fastrnn imports Keras "
                            f"Masking, Embedding, Dense, Dropout, SimpleRNN, GRU, LSTM and "
                            f"Bidirectional layers")
    if not layers:
        raise ValueError("from_keras: the Keras model has no layers")
    return Sequential(layers)


# --- ONNX --------------------------------------------------------------------------
# gate blocks from PyTorch's order to ONNX's: LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h
_ONNX_GATES = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}
# ops that only move, slice or reshape tensors between recurrent nodes (the
# glue of stacked or exported models); any other op computes something that
# the returned layers would not, so from_onnx refuses it unless told otherwise
_ONNX_GLUE_OPS = {"Transpose", "Reshape", "Slice", "Squeeze", "Unsqueeze", "Concat", "Identity",
                  "Constant", "ConstantOfShape", "Shape", "Gather", "Cast", "Expand", "Split"}


def _onnx_gate_attributes(layer, kind, dirs):
    """A node's activations (alpha, beta compactly), clip and input_forget."""
    cfg = layer._config
    attrs = {}
    if kind == "RNN" and cfg["nonlinearity"] == "tanh" and cfg["clip"] is None:
        return attrs   # (ONNX's default; relu is written, as before the options)
    onnx_names = {v: k for k, v in _ONNX_ACTIVATION_NAMES.items()}
    spelled = {"leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu",
               "scaledtanh": "ScaledTanh", "hardsigmoid": "HardSigmoid"}
    roles = {"RNN": ["nonlinearity"], "GRU": ["recurrent_activation", "activation"],
             "LSTM": ["recurrent_activation", "activation", "cell_activation"]}[kind]
    names, alphas, betas = [], [], []
    for d in range(dirs):
        for role in roles:
            value = cfg[role] if role != "cell_activation" or cfg[role] is not None \
                else cfg["activation"]
            spec = _gate_options.per_direction(kind, role, value, dirs)[d]
            key, params = (spec, ()) if isinstance(spec, str) else (spec[0], tuple(spec[1:]))
            if key == "linear":
                key, params = "affine", (1.0, 0.0)
            defaults = [p for p in (_gate_options.ACTIVATIONS[key] or ()) if p is not None]
            params = list(params) + defaults[len(params):]
            onnx_key = onnx_names[key]
            names.append(spelled.get(onnx_key, onnx_key.capitalize()))
            reads = _ONNX_READS.get(key, (False, False))
            if reads[0]:
                alphas.append(params[0])
            if reads[1]:
                betas.append(params[1])
    attrs["activations"] = names
    if alphas:
        attrs["activation_alpha"] = alphas
    if betas:
        attrs["activation_beta"] = betas
    if cfg["clip"] is not None:
        attrs["clip"] = cfg["clip"]
    if cfg.get("input_forget"):
        attrs["input_forget"] = 1
    return attrs


def to_onnx(layer: RNN | GRU | LSTM, path: str | os.PathLike[str] | None = None,
            lengths: bool = False, opset: int = 17) -> Any:
    """An ONNX model computing a fastrnn RNN/GRU/LSTM layer (one ONNX node per
    layer, weights as initializers; a GRU's ``linear_before_reset`` is 1 for
    reset_after=True, PyTorch's form, and 0 for reset_after=False).

    Graph inputs: ``X`` laid out as the layer takes batched input ((T, B, D),
    or (B, T, D) with batch_first; T and B symbolic), ``initial_h`` (and
    ``initial_c`` for LSTM) of shape (num_layers * dirs, B, H), and with
    ``lengths=True`` ``sequence_lens`` (int32, (B,)): PyTorch's packed
    semantics, as the layer's ``lengths``. Outputs: ``Y`` (as the layer's
    output), ``Y_h`` (and ``Y_c``): the final state, which a streaming caller
    feeds back as the next ``initial_h``/``initial_c``.

    A layer with ``learn_initial_state=True`` has no ``initial_h`` /
    ``initial_c`` inputs: its learned states are constants of the graph,
    broadcast over the batch (Expand to X's batch size), as the layer's call
    without ``hx``. ``weight_dropout`` acts in training only, so the graph
    (inference) is the same with it or without.

    Parameters
    ----------
    layer : fastrnn RNN, GRU or LSTM
    path : str or path-like, optional; where to save the model as well
    lengths : bool, default False; add the ``sequence_lens`` input
    opset : int, default 17
        10 (the graph's Slice takes its bounds as inputs) up to the newest
        the installed onnx knows.

    Returns
    -------
    onnx.ModelProto
        Of the layer's dtype. A float64 graph is valid ONNX, but ONNX
        Runtime has no float64 kernel for RNN, GRU or LSTM: convert the
        layer to float32 first to run it there.
    """
    kind = _class_name("to_onnx", layer, _LAYERS, "RNN, GRU or LSTM")
    if layer._config.get("layer_norm"):
        raise ValueError(f"to_onnx: {kind} has layer_norm=True; ONNX's {kind} operator has no "
                         f"layer normalisation")
    if layer._config.get("proj_size"):
        raise ValueError(f"to_onnx: {kind} has proj_size={layer._config['proj_size']}; ONNX's "
                         f"LSTM operator has no projection (PyTorch's exporter refuses it too)")
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise ImportError("fastrnn: to_onnx needs the onnx package (pip install onnx)") from None
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral):
        raise TypeError(f"to_onnx: opset must be an int, got {opset!r}")
    if not 10 <= opset <= newest:
        raise ValueError(f"to_onnx: opset must be an int from 10 (the graph's Slice takes its "
                         f"bounds as inputs) to {newest} (the newest this onnx knows), got "
                         f"{opset!r}")
    lengths = v.check_bool("to_onnx", "lengths", lengths)
    if path is not None:
        v.check_path("to_onnx", "path", path)
    if layer._config.get("zoneout"):
        raise ValueError(f"to_onnx: {kind} has zoneout={layer._config['zoneout']!r}; ONNX's "
                         f"{kind} cannot express it (its inference blends each step's state "
                         f"with the one before)")
    cfg = layer._config
    H, L = cfg["hidden_size"], cfg["num_layers"]
    dirs = 2 if cfg["bidirectional"] else 1
    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[cfg["dtype"].name]
    order = _ONNX_GATES[kind]
    params = layer.state_dict()

    def reorder(a):
        blocks = np.split(a, len(order), axis=0)
        return np.concatenate([blocks[i] for i in order], axis=0)

    nodes, inits = [], []

    def const(name, values):
        inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    x_name = "X"
    if cfg["batch_first"]:
        nodes.append(helper.make_node("Transpose", ["X"], ["X_tm"], perm=[1, 0, 2]))
        x_name = "X_tm"
    state_names = ["initial_h"] + (["initial_c"] if kind == "LSTM" else [])
    learned = cfg.get("learn_initial_state", False)
    if learned:
        # the learned states (L * dirs, 1, H), expanded to (L * dirs, B, H)
        batch_axis = 0 if cfg["batch_first"] else 1
        nodes.append(helper.make_node("Shape", ["X"], ["X_shape"]))
        nodes.append(helper.make_node("Slice", ["X_shape", const("batch_start", [batch_axis]),
                                                const("batch_end", [batch_axis + 1]),
                                                const("batch_axes", [0])], ["batch"]))
        nodes.append(helper.make_node("Concat", [const("state_rows", [L * dirs]), "batch",
                                                 const("state_width", [H])],
                                      ["state_shape"], axis=0))
        for state in state_names:
            values = np.stack([params[f"{state}_l{k}" + ("_reverse" if d else "")]
                               for k in range(L) for d in range(dirs)])[:, None, :]
            inits.append(numpy_helper.from_array(values, f"{state}_learned"))
            nodes.append(helper.make_node("Expand", [f"{state}_learned", "state_shape"],
                                          [state]))
    final_h, final_c = [], []
    current = x_name
    for k in range(L):
        sfx = [f"_l{k}", f"_l{k}_reverse"][:dirs]
        W = np.stack([reorder(params["weight_ih" + s]) for s in sfx])
        R = np.stack([reorder(params["weight_hh" + s]) for s in sfx])
        node_inputs = [current, f"W{k}", f"R{k}"]
        inits += [numpy_helper.from_array(W, f"W{k}"), numpy_helper.from_array(R, f"R{k}")]
        if cfg["bias"]:
            Bias = np.stack([np.concatenate([reorder(params["bias_ih" + s]),
                                             reorder(params["bias_hh" + s])]) for s in sfx])
            inits.append(numpy_helper.from_array(Bias, f"B{k}"))
            node_inputs.append(f"B{k}")
        else:
            node_inputs.append("")
        node_inputs.append("sequence_lens" if lengths else "")
        bounds = [const(f"s{k}", [k * dirs]), const(f"e{k}", [(k + 1) * dirs]),
                  const(f"a{k}", [0])]
        for state in state_names:   # this layer's rows of the stacked state
            nodes.append(helper.make_node("Slice", [state, *bounds], [f"{state}_{k}"]))
            node_inputs.append(f"{state}_{k}")
        outputs = [f"Y{k}", f"Yh{k}"] + ([f"Yc{k}"] if kind == "LSTM" else [])
        attrs = {"hidden_size": H,
                 "direction": "bidirectional" if dirs == 2 else "forward"}
        if kind == "GRU":
            attrs["linear_before_reset"] = int(cfg["reset_after"])
        attrs.update(_onnx_gate_attributes(layer, kind, dirs))
        if "weight_peephole_l0" in params:
            P = np.stack([np.concatenate([np.split(params["weight_peephole" + s], 3)[i]
                                          for i in _ONNX_PEEPHOLES]) for s in sfx])
            inits.append(numpy_helper.from_array(P, f"P{k}"))
            node_inputs.append(f"P{k}")
        nodes.append(helper.make_node(kind, node_inputs, outputs, **attrs))
        final_h.append(f"Yh{k}")
        if kind == "LSTM":
            final_c.append(f"Yc{k}")
        # Y (T, dirs, B, H) -> (T, B, dirs * H), the next layer's input
        nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"Yt{k}"], perm=[0, 2, 1, 3]))
        current = f"H{k}"
        nodes.append(helper.make_node("Reshape", [f"Yt{k}", const(f"shape{k}", [0, 0, -1])],
                                      [current]))
    if cfg["batch_first"]:
        nodes.append(helper.make_node("Transpose", [current], ["Y"], perm=[1, 0, 2]))
    else:
        nodes.append(helper.make_node("Identity", [current], ["Y"]))
    nodes.append(helper.make_node("Concat", final_h, ["Y_h"], axis=0))
    if kind == "LSTM":
        nodes.append(helper.make_node("Concat", final_c, ["Y_c"], axis=0))

    seq_dims = ["B", "T"] if cfg["batch_first"] else ["T", "B"]
    state_shape = [L * dirs, "B", H]
    inputs = [helper.make_tensor_value_info("X", elem, seq_dims + [cfg["input_size"]])]
    if not learned:
        inputs += [helper.make_tensor_value_info(n, elem, state_shape) for n in state_names]
    if lengths:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))
    outputs = [helper.make_tensor_value_info("Y", elem, seq_dims + [dirs * H]),
               helper.make_tensor_value_info("Y_h", elem, state_shape)]
    if kind == "LSTM":
        outputs.append(helper.make_tensor_value_info("Y_c", elem, state_shape))
    graph = helper.make_graph(nodes, f"fastrnn_{kind}", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="fastrnn")
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, path)
    return model


# --- from_onnx: reading, checking, layout ---------------------------------------------
# Bounds on what from_onnx reads and builds (module-level so that the tests can lower
# them). A model is one self-contained file of at most _ONNX_MAX_FILE_BYTES (protobuf's
# own limit for one message). The layers built from it hold at most _ONNX_LAYER_FACTOR
# times the model's size plus _ONNX_LAYER_SLACK bytes, counting each layer's parameters
# in the requested dtype plus _ONNX_LAYER_OVERHEAD for the object itself (about 9 KB
# measured for a small bidirectional LSTM): 8 covers int8 weights imported as float64;
# more can only come from nodes sharing weights, or from a flood of tiny nodes.
_ONNX_MAX_FILE_BYTES = 2**31
_ONNX_LAYER_FACTOR = 8
_ONNX_LAYER_SLACK = 64 * 2**20
_ONNX_LAYER_OVERHEAD = 16 * 2**10
_ONNX_DOMAINS = ("", "ai.onnx")
_ONNX_GATE_COUNT = {"RNN": 1, "GRU": 3, "LSTM": 4}
_ONNX_INPUTS = {"RNN": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
                "GRU": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
                "LSTM": ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")}
_ONNX_OUTPUTS = {"RNN": ("Y", "Y_h"), "GRU": ("Y", "Y_h"), "LSTM": ("Y", "Y_h", "Y_c")}
# activations per direction: RNN f; GRU f (gates), g (candidate); LSTM f, g, h
_ONNX_DEFAULT_ACTIVATIONS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"],
                             "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
# ONNX's activation names (matched without case, as ONNX Runtime does) ->
# fastrnn's, and whether each reads an alpha, a beta
_ONNX_ACTIVATION_NAMES = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid",
                          "affine": "affine", "leakyrelu": "leaky_relu",
                          "thresholdedrelu": "thresholded_relu", "scaledtanh": "scaled_tanh",
                          "hardsigmoid": "hard_sigmoid", "elu": "elu", "softsign": "softsign",
                          "softplus": "softplus"}
_ONNX_READS = {"affine": (True, True), "leaky_relu": (True, False),
               "thresholded_relu": (True, False), "scaled_tanh": (True, True),
               "hard_sigmoid": (True, True), "elu": (True, False)}
# what ONNX Runtime takes for an alpha/beta the node does not give where
# ONNX's own operators agree (LeakyRelu 0.01, HardSigmoid 0.2/0.5, Elu 1);
# for Affine, ThresholdedRelu and ScaledTanh they do not, and from_onnx refuses
_ONNX_OMITTED = {"leaky_relu": (0.01, None), "hard_sigmoid": (0.2, 0.5), "elu": (1.0, None)}
# fastrnn's gate options -> ONNX's peephole order: P is i, o, f
_ONNX_PEEPHOLES = [0, 2, 1]
# weight storage: TensorProto data type name -> (bytes per value in raw_data, the typed
# field holding the values otherwise); real floating-point and integer types only
_ONNX_WEIGHT_TYPES = {"FLOAT": (4, "float_data"), "DOUBLE": (8, "double_data"),
                      "FLOAT16": (2, "int32_data"), "BFLOAT16": (2, "int32_data"),
                      "INT8": (1, "int32_data"), "UINT8": (1, "int32_data"),
                      "INT16": (2, "int32_data"), "UINT16": (2, "int32_data"),
                      "INT32": (4, "int32_data"), "UINT32": (4, "uint64_data"),
                      "INT64": (8, "int64_data"), "UINT64": (8, "uint64_data")}


def _onnx_module(caller):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError(f"fastrnn: {caller} needs the onnx package (pip install onnx)") from None
    return onnx, numpy_helper


def _clip(text, limit=60):
    """A name for a message: at most about ``limit`` characters of it, the
    start and the end."""
    if len(text) <= limit:
        return text
    dots = b"..." if isinstance(text, bytes) else "..."   # bytes: a name not in UTF-8
    return text[:limit // 2] + dots + text[len(text) - limit // 2:]


def _dims_str(dims):
    dims = list(dims[:9])
    if len(dims) > 8:
        return "(" + ", ".join(str(d) for d in dims[:8]) + ", ...)"
    return shape_str(dims)


def _read_at_most(file, limit):
    """The file's bytes, read in pieces (``read(n)`` would allocate n bytes at
    once), stopping once more than ``limit`` have come."""
    pieces, total = [], 0
    while total <= limit:
        piece = file.read(min(2**26, limit + 1 - total))
        if not isinstance(piece, bytes):
            raise TypeError(f"from_onnx: expected a binary file object, got one whose read() "
                            f"returns {type(piece).__name__}")
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)


def _onnx_read(model, onnx):
    """(ModelProto, size in bytes) from a ModelProto, a path or a binary file object;
    a file is read only if it is regular and within _ONNX_MAX_FILE_BYTES, without
    following external-data references."""
    if isinstance(model, onnx.ModelProto):
        return model, model.ByteSize()
    limit = _ONNX_MAX_FILE_BYTES
    if isinstance(model, bytes) and b"\0" in model:
        raise ValueError(f"from_onnx: got {len(model)} bytes holding a NUL byte, which a path "
                         f"cannot hold; for a serialized model pass io.BytesIO(data) or "
                         f"onnx.load_from_string(data)")
    if isinstance(model, (str, bytes, os.PathLike)):
        path = os.fsdecode(model)

        def cannot(why):
            raise ValueError(f"from_onnx: cannot read an ONNX model from {_clip(path, 200)!r}: "
                             f"{why}")

        if "\0" in path:
            cannot("the path holds a NUL character")
        try:
            # a directory, FIFO or device (/dev/zero) is refused before it is opened
            if not stat.S_ISREG(os.stat(path).st_mode):
                cannot("not a regular file")
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size > limit:
                    cannot(f"the file has {size} bytes, more than the limit of {limit} "
                           f"(protobuf's limit for one model)")
                data = file.read(size + 1)   # one more shows a file that grew
        except OSError as exc:
            cannot(exc.strerror or str(exc))
        ext = os.path.splitext(path)[1]
        fmt = onnx.serialization.registry.get_format_from_file_extension(ext) or "protobuf"
    elif hasattr(model, "read"):
        path, fmt = repr(model), "protobuf"
        data = _read_at_most(model, limit)
    else:
        raise TypeError(f"from_onnx: expected an onnx.ModelProto or a path to an .onnx file, "
                        f"got {type(model).__name__}")
    if len(data) > limit:
        raise ValueError(f"from_onnx: cannot read an ONNX model from {_clip(path, 200)!r}: more "
                         f"than {limit} bytes (protobuf's limit for one model)")
    try:
        return onnx.load_model_from_string(data, format=fmt), len(data)
    except Exception as exc:   # the parsers raise several kinds for a damaged file
        raise ValueError(f"from_onnx: cannot read an ONNX model from {_clip(path, 200)!r}: "
                         f"{type(exc).__name__}: {_clip(str(exc), 300)}") from None


def _onnx_op(node):
    """The op's name, prefixed with its domain when not ONNX's own."""
    if node.domain in _ONNX_DOMAINS:
        return node.op_type
    return f"{node.domain}.{node.op_type}"


def _onnx_label(node, index):
    if node.name:
        return repr(_clip(node.name))
    if node.output and node.output[0]:
        return repr(_clip(node.output[0]))
    return f"number {index}"


def _onnx_describe(attr, A):
    """What an attribute holds, for a message: 'a float (4.7)', 'a tensor', ..."""
    def values(items, fmt=str):
        items = list(items[:9])
        text = ", ".join(fmt(x) for x in items[:8]) + (", ..." if len(items) > 8 else "")
        return f"[{text}]"

    text = lambda s: repr(_clip(s.decode("utf-8", "replace")))
    kinds = {A.FLOAT: lambda: f"a float ({attr.f:.7g})", A.INT: lambda: f"an int ({attr.i})",
             A.STRING: lambda: f"a string ({text(attr.s)})",
             A.FLOATS: lambda: f"a list of floats ({values(attr.floats, '{:.7g}'.format)})",
             A.INTS: lambda: f"a list of ints ({values(attr.ints)})",
             A.STRINGS: lambda: f"a list of strings ({values(attr.strings, text)})",
             A.TENSOR: lambda: "a tensor", A.GRAPH: lambda: "a graph",
             A.SPARSE_TENSOR: lambda: "a sparse tensor", A.TENSORS: lambda: "a list of tensors",
             A.GRAPHS: lambda: "a list of graphs",
             A.SPARSE_TENSORS: lambda: "a list of sparse tensors",
             A.TYPE_PROTO: lambda: "a type", A.TYPE_PROTOS: lambda: "a list of types"}
    if attr.type in kinds:
        return kinds[attr.type]()
    return "an attribute without a type" if attr.type == A.UNDEFINED else \
        f"an attribute of unknown type {attr.type}"


def _onnx_attributes(node, op, where, A):
    """The node's attributes by name, each of the type ONNX defines for it;
    an unknown, repeated or mistyped attribute raises."""
    spec = {"activation_alpha": A.FLOATS, "activation_beta": A.FLOATS,
            "activations": A.STRINGS, "clip": A.FLOAT, "direction": A.STRING,
            "hidden_size": A.INT, "layout": A.INT}
    spec.update({"GRU": {"linear_before_reset": A.INT},
                 "LSTM": {"input_forget": A.INT}}.get(op, {}))
    expected = {A.INT: "an int", A.FLOAT: "a float", A.STRING: "a string",
                A.FLOATS: "a list of floats", A.STRINGS: "a list of strings"}
    decode = lambda s: s.decode("utf-8", "replace")
    read = {A.INT: lambda a: a.i, A.FLOAT: lambda a: a.f, A.STRING: lambda a: decode(a.s),
            A.FLOATS: lambda a: list(a.floats),
            A.STRINGS: lambda a: [decode(s) for s in a.strings]}
    values = {}
    for attr in node.attribute:
        name = attr.name
        if name not in spec:
            raise ValueError(f"{where}: attribute {_clip(name)!r}: not an attribute of ONNX "
                             f"{op} (its attributes: {', '.join(sorted(spec))})")
        if name in values:
            count = sum(1 for other in node.attribute if other.name == name)
            raise ValueError(f"{where}: attribute {name}: given {count} times")
        if attr.type != spec[name]:
            raise TypeError(f"{where}: attribute {name}: expected {expected[spec[name]]}, "
                            f"got {_onnx_describe(attr, A)}")
        values[name] = read[attr.type](attr)
    return values


class _OnnxNode:
    """One checked recurrent node: what from_onnx builds from it."""

    def __init__(self, index, node, op, where):
        self.index, self.node, self.op, self.where = index, node, op, where
        self.tensors = {}           # 'W', 'R', 'B' -> TensorProto, checked
        self.kwargs = {}
        self.dirs = self.hidden_size = self.input_size = None
        self.batch_first = False
        self.layout_reason = ""     # why the node is batch-first, for messages
        self.reverse = False        # direction="reverse": a Reversed layer
        self.layout = 0             # the node's layout attribute

    def values(self):
        return sum(math.prod(t.dims) for t in self.tensors.values())


def _onnx_weight(plan, what, name, initializers, counts, onnx):
    """The initializer a node reads as input ``what`` (W, R or B): stored in the
    model, of a real data type (checked here; its shape and size by the caller)."""
    where, TensorProto = plan.where, onnx.TensorProto
    if counts.get(name, 0) > 1:
        raise ValueError(f"{where}: input {what}: {counts[name]} initializers are named "
                         f"{_clip(name)!r}")
    if name not in initializers:
        if counts.get(name):
            raise ValueError(f"{where}: input {what}: {_clip(name)!r} is a sparse initializer; "
                             f"fastrnn imports dense weights")
        raise ValueError(f"{where}: input {what}: {_clip(name)!r} is not an initializer; "
                         f"fastrnn imports constant weights")
    tensor = initializers[name]
    if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
        raise ValueError(f"{where}: input {what}: initializer {_clip(name)!r} keeps its data "
                         f"outside the model (external data); fastrnn imports only weights "
                         f"stored in the model itself")
    if tensor.HasField("segment"):
        raise ValueError(f"{where}: input {what}: initializer {_clip(name)!r} is one segment "
                         f"of a tensor; fastrnn imports whole tensors")
    try:
        type_name = TensorProto.DataType.Name(tensor.data_type)
    except ValueError:
        type_name = "UNDEFINED"
    if type_name == "UNDEFINED":
        raise ValueError(f"{where}: input {what}: unknown data type {tensor.data_type}")
    if type_name not in _ONNX_WEIGHT_TYPES:
        raise TypeError(f"{where}: input {what}: data type {type_name}: fastrnn imports real "
                        f"floating-point or integer weights")
    return tensor


def _onnx_check_data(plan, what, tensor):
    """The values the initializer holds are as many as its dims say (counted
    from the bytes and fields present: nothing is allocated)."""
    count = math.prod(tensor.dims)
    itemsize, field = _ONNX_WEIGHT_TYPES[tensor.DataType.Name(tensor.data_type)]
    shape = _dims_str(tensor.dims)
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) != count * itemsize:
            raise ValueError(f"{plan.where}: input {what}: initializer {_clip(tensor.name)!r} "
                             f"holds {len(tensor.raw_data)} bytes of data, expected {count} "
                             f"values {shape} of {itemsize} bytes")
    elif len(getattr(tensor, field)) != count:
        raise ValueError(f"{plan.where}: input {what}: initializer {_clip(tensor.name)!r} "
                         f"holds {len(getattr(tensor, field))} values, expected {count} "
                         f"values {shape}")


def _onnx_plan(index, node, op, initializers, counts, onnx):
    """Check one RNN/GRU/LSTM node completely (attributes, inputs, outputs, the
    weights' types, shapes and stored sizes) without converting anything."""
    where = f"from_onnx: {op} node {_onnx_label(node, index)}"
    plan = _OnnxNode(index, node, op, where)

    def refuse(what, why):
        raise ValueError(f"{where}: {what}: {why}")

    attrs = _onnx_attributes(node, op, where, onnx.AttributeProto)
    direction = attrs.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        refuse(f"direction={_clip(direction)!r}", "must be 'forward', 'reverse' or "
               "'bidirectional'")
    plan.reverse = direction == "reverse"
    layout = attrs.get("layout", 0)
    if layout not in (0, 1):
        refuse(f"layout={layout}", "must be 0 or 1")
    plan.layout = layout
    options = {}
    if "clip" in attrs:
        clip = attrs["clip"]
        if not (math.isfinite(clip) and clip > 0):
            refuse(f"clip={float(format(clip, '.7g'))!r}", "must be a finite number > 0")
        options["clip"] = float(clip)
    for key in ("input_forget", "linear_before_reset"):
        if attrs.get(key, 0) not in (0, 1):
            refuse(f"{key}={attrs[key]}", "must be 0 or 1")
    if attrs.get("input_forget", 0) == 1:
        options["input_forget"] = True
    dirs = 2 if direction == "bidirectional" else 1
    options.update(_onnx_activations(op, attrs, dirs, refuse))
    if "hidden_size" in attrs and attrs["hidden_size"] < 1:
        refuse("attribute hidden_size", f"expected a positive int, got {attrs['hidden_size']}")

    labels, given = _ONNX_INPUTS[op], len(node.input)
    if given > len(labels):
        refuse(f"expected at most {len(labels)} inputs ({', '.join(labels)})", f"got {given}")
    if len(node.output) > len(_ONNX_OUTPUTS[op]):
        refuse(f"expected at most {len(_ONNX_OUTPUTS[op])} outputs "
               f"({', '.join(_ONNX_OUTPUTS[op])})", f"got {len(node.output)}")
    inputs = list(node.input) + [""] * (len(labels) - given)
    for i in range(3):
        if not inputs[i]:
            why = f"the node has {given} input{'s' if given != 1 else ''}" if i >= given \
                else "its name is empty"
            refuse(f"input {labels[i]}", f"missing ({why})")

    G = _ONNX_GATE_COUNT[op]
    gates = "H" if G == 1 else f"{G}*H"
    R = _onnx_weight(plan, "R", inputs[2], initializers, counts, onnx)
    if "hidden_size" in attrs:
        H = attrs["hidden_size"]
        if list(R.dims) != [dirs, G * H, H]:
            refuse("input R", f"expected shape ({dirs}, {gates}, H) = ({dirs}, {G * H}, {H}) "
                   f"(direction {direction!r}, hidden_size {H}), got {_dims_str(R.dims)}")
        source = f"hidden_size {H}"
    else:   # ONNX lets hidden_size be left out: R's shape gives it
        if len(R.dims) != 3 or R.dims[0] != dirs or R.dims[2] < 1 \
                or R.dims[1] != G * R.dims[2]:
            refuse("input R", f"expected shape ({dirs}, {gates}, H) (direction {direction!r}, "
                   f"H >= 1), got {_dims_str(R.dims)}")
        H = R.dims[2]
        source = f"H = {H} from R"
    _onnx_check_data(plan, "R", R)
    W = _onnx_weight(plan, "W", inputs[1], initializers, counts, onnx)
    if len(W.dims) != 3 or W.dims[0] != dirs or W.dims[1] != G * H or W.dims[2] < 1:
        hint = ", input size D >= 1" if len(W.dims) == 3 and W.dims[2] < 1 else ""
        refuse("input W", f"expected shape ({dirs}, {gates}, D) = ({dirs}, {G * H}, D) "
               f"(direction {direction!r}, {source}{hint}), got {_dims_str(W.dims)}")
    _onnx_check_data(plan, "W", W)
    plan.tensors = {"W": W, "R": R}
    if inputs[3]:
        B = _onnx_weight(plan, "B", inputs[3], initializers, counts, onnx)
        if list(B.dims) != [dirs, 2 * G * H]:
            refuse("input B", f"expected shape ({dirs}, {2 * G}*H) = ({dirs}, {2 * G * H}) "
                   f"(direction {direction!r}, {source}), got {_dims_str(B.dims)}")
        _onnx_check_data(plan, "B", B)
        plan.tensors["B"] = B
    if op == "LSTM" and inputs[7]:
        P = _onnx_weight(plan, "P", inputs[7], initializers, counts, onnx)
        if list(P.dims) != [dirs, 3 * H]:
            refuse("input P", f"expected shape ({dirs}, 3*H) = ({dirs}, {3 * H}) "
                   f"(direction {direction!r}, {source}), got {_dims_str(P.dims)}")
        _onnx_check_data(plan, "P", P)
        plan.tensors["P"] = P
        options["peepholes"] = True
    plan.dirs, plan.hidden_size, plan.input_size = dirs, H, W.dims[2]
    plan.kwargs = {"bidirectional": dirs == 2, "bias": bool(inputs[3]), **options}
    if op == "GRU":   # ONNX's default is reset before (0)
        plan.kwargs["reset_after"] = attrs.get("linear_before_reset", 0) == 1
    return plan


# ops that pass (some of) a tensor's values on, moved, broadcast or converted:
# a state made by them from the caller's input is the caller's, from zeros zeros
_ONNX_MOVE_OPS = {"Expand", "Tile", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity",
                  "Transpose", "Slice", "Gather", "Split"}


def _onnx_check_caller_inputs(graph, plans, initializers, numpy_helper):
    """A node's sequence_lens, initial_h and initial_c become the layer
    call's ``lengths`` and ``hx``, which the caller passes: each must be
    absent or come from a graph input (``to_onnx`` slices each layer's state
    from one) or, for a state, from zeros (PyTorch's exporter expands a zero
    tensor); a value fixed in the model (``to_onnx``'s learned initial state,
    constant lengths) would be lost, so it is refused by name."""
    inputs = {value.name for value in graph.input} - set(initializers)
    producers = {out: node for node in graph.node for out in node.output if out}

    def from_caller_or_zeros(name, zeros_ok, depth=0):
        if name in inputs:
            return True
        if name in initializers:
            tensor = initializers[name]
        elif name in producers and depth < 32:
            node = producers[name]
            op = _onnx_op(node)
            if op in _ONNX_MOVE_OPS and node.input:
                return from_caller_or_zeros(node.input[0], zeros_ok, depth + 1)
            if op == "Concat":
                return all(from_caller_or_zeros(i, zeros_ok, depth + 1) for i in node.input)
            if op not in ("Constant", "ConstantOfShape"):
                return False
            values = [a.t for a in node.attribute if a.name == "value" and a.type == a.TENSOR]
            if not values:   # ConstantOfShape's default value is a zero; a Constant's
                # value_float(s) / value_int(s) (then broadcast by an Expand) are numbers
                scalars = [x for a in node.attribute for x in (
                    [a.f] if a.name == "value_float" and a.type == a.FLOAT else
                    a.floats if a.name == "value_floats" and a.type == a.FLOATS else
                    [a.i] if a.name == "value_int" and a.type == a.INT else
                    a.ints if a.name == "value_ints" and a.type == a.INTS else [None])]
                if op == "ConstantOfShape":
                    return zeros_ok
                return zeros_ok and bool(scalars) and all(x == 0 for x in scalars)
            tensor = values[0]
        else:
            return False
        # a constant: zeros only where they are allowed (a state's, not lengths);
        # external data is never read (see from_onnx)
        if not zeros_ok or tensor.data_location == tensor.EXTERNAL or len(tensor.external_data):
            return False
        with np.errstate(all="ignore"):
            return not np.any(numpy_helper.to_array(tensor))

    for plan in plans:
        labels = _ONNX_INPUTS[plan.op]
        for i in range(4, min(len(plan.node.input), 7)):
            name = plan.node.input[i]
            if not name or from_caller_or_zeros(name, zeros_ok=i > 4):
                continue
            fixed = "a constant of the model" if name in initializers else \
                "computed in the graph"
            call = "lengths" if i == 4 else "hx"
            raise ValueError(f"{plan.where}: input {labels[i]} ({_clip(name)!r}) is {fixed}; "
                             f"fastrnn takes it from the caller (the layer call's {call}), so "
                             f"a value fixed in the model would be lost (only a graph input, "
                             f"or zeros for a state, can be imported)")


def _onnx_activations(op, attrs, dirs, refuse):
    """The layer arguments of a node's activations, activation_alpha and
    activation_beta (none when they are the defaults). ONNX Runtime reads
    the two lists compactly, in the order of the functions: the k-th alpha
    goes to the k-th function that takes an alpha."""
    names = list(attrs.get("activations", []))
    per_dir = len(_ONNX_DEFAULT_ACTIVATIONS[op])
    if not names:
        names = _ONNX_DEFAULT_ACTIVATIONS[op] * dirs
    if len(names) != per_dir * dirs:
        refuse("attribute activations", f"expected {per_dir * dirs} names ({per_dir} per "
               f"direction), got {len(names)}")
    alphas = list(attrs.get("activation_alpha", []))
    betas = list(attrs.get("activation_beta", []))
    specs = []
    for name in names:
        key = _ONNX_ACTIVATION_NAMES.get(name.lower())
        if key is None:
            refuse(f"activations={[_clip(n) for n in names]}",
                   f"{_clip(name)!r} is not an ONNX activation (expected one of Relu, Tanh, "
                   f"Sigmoid, Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, "
                   f"Elu, Softsign, Softplus)")
        reads = _ONNX_READS.get(key, (False, False))
        params = []
        for i, (wanted, values) in enumerate(zip(reads, (alphas, betas))):
            if not wanted:
                continue
            if values:
                params.append(values.pop(0))
            elif key in _ONNX_OMITTED:
                params.append(_ONNX_OMITTED[key][i])
            else:
                refuse(f"activation {name}", f"activation_{('alpha', 'beta')[i]} gives it no "
                       f"value, and ONNX (its operator's default) and ONNX Runtime (0) "
                       f"disagree on what that means: give it explicitly")
        specs.append((key, *params) if params else key)
    if alphas or betas:
        refuse("activation_alpha/beta", f"{len(alphas)} alpha and {len(betas)} beta values "
               f"left over: more than the activations {[_clip(n) for n in names]} take")
    # per role (f, g, h), the directions' specs
    roles = [[specs[d * per_dir + r] for d in range(dirs)] for r in range(per_dir)]
    one = lambda specs_: specs_[0] if all(s == specs_[0] for s in specs_) else specs_
    if op == "RNN":
        return {"nonlinearity": one(roles[0])}
    out = {"recurrent_activation": one(roles[0]), "activation": one(roles[1])}
    if op == "LSTM" and roles[2] != roles[1]:
        out["cell_activation"] = one(roles[2])
    return out


def _onnx_layouts(graph, plans, initializers, counts, onnx, numpy_helper):
    """Decide each recurrent node's layout from the glue around it (see
    from_onnx's Notes), or refuse a model whose layout no layer reproduces.

    Works on node indices and tensor names only, in time and memory linear in
    the graph's size (no recursion: Identity chains and node chains may be long).
    """
    A, TensorProto = onnx.AttributeProto, onnx.TensorProto
    nodes = graph.node
    alias = {}   # an Identity's output -> its input
    for node in nodes:
        if _onnx_op(node) == "Identity" and len(node.input) == 1 and len(node.output) == 1 \
                and node.input[0] and node.output[0]:
            alias[node.output[0]] = node.input[0]
    resolved = {}

    def root(name):
        path = []
        while name in alias and name not in resolved and len(path) <= len(alias):
            path.append(name)
            name = alias[name]
        name = resolved.get(name, name)
        for step in path:
            resolved[step] = name
        return name

    made, uses = {}, {}   # tensor -> index of the node making it; -> [(index, input slot)]
    for k, node in enumerate(nodes):
        if _onnx_op(node) == "Identity" and node.output and node.output[0] in alias:
            continue
        for name in node.output:
            if name:
                made.setdefault(name, k)
        for slot, name in enumerate(node.input):
            if name:
                uses.setdefault(root(name), []).append((k, slot))
    outputs = {}
    for value in graph.output:
        outputs.setdefault(root(value.name), value.name)
    recurrent = {plan.index: plan for plan in plans}

    def ints_attribute(node, name):
        for attr in node.attribute:
            if attr.name == name:
                return tuple(attr.ints) if attr.type == A.INTS and len(attr.ints) <= 8 else None
        return None

    def int_attribute(node, name, default):
        for attr in node.attribute:
            if attr.name == name:
                return attr.i if attr.type == A.INT else None
        return default

    def small_ints(name):
        """The values of a constant int64 tensor of at most 8 values, else None."""
        name = root(name)
        tensor = None
        if name in initializers and counts.get(name) == 1:
            tensor = initializers[name]
        elif name in made and _onnx_op(nodes[made[name]]) == "Constant":
            for attr in nodes[made[name]].attribute:
                if attr.name == "value_ints" and attr.type == A.INTS and len(attr.ints) <= 8:
                    return tuple(attr.ints)
                if attr.name == "value" and attr.type == A.TENSOR:
                    tensor = attr.t
        if tensor is None or tensor.data_type != TensorProto.INT64 or len(tensor.dims) > 8 \
                or any(d < 0 for d in tensor.dims) or math.prod(tensor.dims) > 8 \
                or tensor.data_location == TensorProto.EXTERNAL or tensor.HasField("segment"):
            return None
        count = math.prod(tensor.dims)
        stored = len(tensor.raw_data) // 8 if tensor.HasField("raw_data") \
            else len(tensor.int64_data)
        if stored != count or (tensor.HasField("raw_data") and len(tensor.raw_data) % 8):
            return None
        return tuple(int(x) for x in numpy_helper.to_array(tensor).ravel())

    def perm(k):
        return ints_attribute(nodes[k], "perm") if _onnx_op(nodes[k]) == "Transpose" else None

    def out(k):
        node = nodes[k]
        return root(node.output[0]) if node.output and node.output[0] else None

    def users(name):
        """Who reads a tensor's values: (node index, input slot), or (None, name)
        for a graph output. Shape and Size read only its shape (exporters size
        the next node's zero state so), which is the same in either layout."""
        found = [(k, slot) for k, slot in uses.get(name, ())
                 if _onnx_op(nodes[k]) not in ("Shape", "Size")]
        return found + ([(None, outputs[name])] if name in outputs else [])

    def label(k, slot):
        if k is None:
            return f"graph output {_clip(slot)!r}"
        return f"{_onnx_op(nodes[k])} node {_onnx_label(nodes[k], k)}"

    def merges(k, slot, plan):
        """The tensor (T, B, dirs * H) that node k makes of Y when it starts
        merging the directions (Transpose(0, 2, 1, 3) then Reshape to
        (0, 0, -1), or Squeeze of axis 1 when there is one direction): a list
        of (merged tensor or None, who uses Y otherwise)."""
        node = nodes[k]
        if slot == 0 and perm(k) == (0, 2, 1, 3) and out(k) is not None:
            found = []
            width = plan.dirs * plan.hidden_size
            for k2, slot2 in users(out(k)):
                reshape = k2 is not None and slot2 == 0 and _onnx_op(nodes[k2]) == "Reshape" \
                    and len(nodes[k2].input) == 2 and out(k2) is not None \
                    and small_ints(nodes[k2].input[1]) in ((0, 0, -1), (0, 0, width)) \
                    and int_attribute(nodes[k2], "allowzero", 0) == 0
                found.append((out(k2), None) if reshape else (None, label(k2, slot2)))
            return found
        if slot == 0 and plan.dirs == 1 and _onnx_op(node) == "Squeeze" \
                and out(k) is not None:
            axes = small_ints(node.input[1]) if len(node.input) > 1 and node.input[1] \
                else ints_attribute(node, "axes")
            if axes in ((1,), (-3,)):
                return [(out(k), None)]
        return [(None, label(k, slot))]

    # every use of each node's Y: time-major, transposed to batch-first, or the X of
    # the next recurrent node (a link: that node continues this one's layout)
    link, time_major, batch_first, refeeds = {}, {}, {}, {}
    for plan in plans:
        k0 = plan.index
        time_major[k0], batch_first[k0], refeeds[k0] = [], [], []
        y = out(k0)
        if y is None:
            continue
        for k, slot in users(y):
            found = [(None, label(k, slot))] if k is None else merges(k, slot, plan)
            for merged, other in found:
                if merged is None:
                    time_major[k0].append(other)
                    continue
                for k2, slot2 in users(merged):
                    if k2 in recurrent and slot2 == 0:
                        link.setdefault(k2, plan)
                    elif k2 is not None and slot2 == 0 and perm(k2) == (1, 0, 2) \
                            and out(k2) is not None:
                        for k3, slot3 in users(out(k2)):
                            if k3 in recurrent and slot3 == 0:
                                refeeds[k0].append(label(k3, slot3))
                            else:
                                batch_first[k0].append(label(k3, slot3))
                    else:
                        time_major[k0].append(label(k2, slot2))

    # a node is batch-first when its X is the Transpose(1, 0, 2) of a tensor, or when
    # it continues (through a link) a chain that starts so
    for plan in plans:
        x = root(plan.node.input[0])
        if plan.index not in link and x in made and perm(made[x]) == (1, 0, 2):
            source = nodes[made[x]].input[0] if nodes[made[x]].input else ""
            plan.batch_first = True
            plan.layout_reason = f"Transpose perm=[1, 0, 2] of {_clip(source)!r}"
    decided = {plan.index: plan for plan in plans if plan.index not in link}
    for plan in plans:
        chain, seen = [], set()
        while plan.index not in decided:
            if plan.index in seen:
                names = ", ".join(_onnx_label(p.node, p.index) for p in chain[:4])
                raise ValueError(f"{plan.where}: input X: the recurrent nodes form a cycle "
                                 f"(through {names}); an ONNX graph is acyclic")
            chain.append(plan)
            seen.add(plan.index)
            plan = link[plan.index]
        head = f"{plan.op} node {_onnx_label(plan.node, plan.index)}"
        for member in chain:
            member.batch_first = plan.batch_first
            member.layout_reason = f"in the chain of recurrent nodes from {head}, which " \
                                   f"reads {plan.layout_reason}"
            decided[member.index] = member

    for k, before in link.items():   # X is the merged Y of the node before
        plan, width = recurrent[k], before.dirs * before.hidden_size
        if plan.input_size != width:
            raise ValueError(f"{plan.where}: input W: expected input size D = {width} (X is "
                             f"the output of {before.op} node "
                             f"{_onnx_label(before.node, before.index)}, of width dirs * H), "
                             f"got D = {plan.input_size}")

    def listed(items):
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    for plan in plans:
        k0 = plan.index
        why = "; a fastrnn layer takes and returns one layout, so no layer computes this"
        if plan.batch_first and (time_major[k0] or refeeds[k0]):
            raise ValueError(f"{plan.where}: output Y: the node reads X batch-first "
                             f"({plan.layout_reason}) but its output is used time-major "
                             f"({listed(time_major[k0] + refeeds[k0])}){why}")
        if not plan.batch_first and batch_first[k0]:
            raise ValueError(f"{plan.where}: output Y: the node reads X time-major but its "
                             f"output is transposed to batch-first "
                             f"({listed(batch_first[k0])}){why}")


def from_onnx(model: Any, dtype: DTypeLike = "float32",
              other_ops: str = "raise") -> list[RNN | GRU | LSTM | Reversed]:
    """fastrnn layers for the RNN, GRU and LSTM nodes of an ONNX model.

    Returns a list with one single-layer fastrnn layer per recurrent node, in
    graph order (a ``direction="reverse"`` node gives a ``Reversed`` layer,
    which runs the sequence backwards, within each ``sequence_lens``, and
    returns its output in the original time order, as ONNX does). Applied as the graph connects them (for a stack, one after
    the other, each on the previous one's output) on the data the model takes,
    they compute the model's ``Y``, in its layout (see Notes), and each
    layer's final state is its node's ``Y_h`` (and ``Y_c``). Ops that only move tensors
    (Transpose, Reshape, Slice, Concat, ...) may sit between them; any other
    op (a Gemm head, an activation) raises a ValueError naming it, since the
    layers alone would not compute the model, unless ``other_ops="ignore"``
    (then the caller runs those parts). Every attribute is honoured (the
    activations with their alpha and beta, ``clip``, ``input_forget`` and
    peepholes ``P`` as the layers' gate options) or refused with a
    ValueError naming it; weights must be initializers stored in the model. A
    node's ``sequence_lens``, ``initial_h`` and ``initial_c`` are the layer
    call's ``lengths`` and ``hx``: they must come from the model's inputs (or,
    for the states, be zeros, as PyTorch's exporter writes them); one fixed in
    the model (a constant, ``to_onnx``'s learned initial state) is refused.

    Parameters
    ----------
    model : onnx.ModelProto, a path to an .onnx file, or a binary file object
    dtype : {'float32', 'float64'}, default 'float32'
        The layers' dtype; weights stored as any real floating-point or
        integer type are converted to it.
    other_ops : {'raise', 'ignore'}, default 'raise'

    Returns
    -------
    list of RNN, GRU, LSTM or Reversed

    Raises
    ------
    TypeError
        For an argument of the wrong type, an attribute of the wrong type
        (``hidden_size=4.7``, ``hidden_size="4"``) or weights of a data type
        that is not real floating-point or integer (string, bool, complex).
    ValueError
        For a file that cannot be read, an unsupported op or attribute, a
        missing input, weights of the wrong shape or with fewer (or more)
        values stored than their dims declare, non-finite weights, external
        data, or a model over the bounds below. Each message names the node
        and the attribute or input, what was expected and what was got.

    Notes
    -----
    **layout=1.** A node with ``layout=1`` (opset 14) is batch-first: X
    (B, T, D), ``initial_h``/``initial_c`` and ``Y_h``/``Y_c`` (B, dirs, H),
    Y (B, T, dirs, H). It becomes a ``batch_first=True`` layer, whose output
    (B, T, dirs * H) is that Y reshaped to (B, T, dirs, H) and whose states
    (dirs, B, H) are those of the node transposed by (1, 0, 2).

    **Layout.** An ONNX recurrent node with ``layout=0`` (the default) is
    time-major: X is (T, B, D) and Y is (T, dirs, B, H). A node becomes a ``batch_first=True`` layer when the
    model feeds it batch-first data: its X is the Transpose (perm [1, 0, 2])
    of a tensor (the layer takes that tensor), or it continues a chain of
    recurrent nodes (each X the previous node's merged Y) that starts so.
    This is how ``to_onnx`` and PyTorch's exporter write ``batch_first``
    layers. Such a node's Y must leave batch-first too: merged to
    (T, B, dirs * H) (Transpose perm [0, 2, 1, 3] then Reshape to [0, 0, -1],
    or Squeeze of axis 1 with one direction), then transposed back with perm
    [1, 0, 2], or fed to the next node of the chain (or not used at all).
    Every other node is a time-major layer, taking X as the node does; its
    Y, if used as it is, is the layer's output (T, B, dirs * H) with the
    directions split out. Ops that read only Y's shape (Shape, Size) do not
    count. A model whose layout changes across a node (batch-first input and
    time-major output, or the reverse) is refused with a ValueError naming
    the node, since a fastrnn layer takes and returns one layout; so is a
    node whose W does not fit the width of the node output it reads.

    **Untrusted files.** Every attribute's type, every weight's data type
    and shape, and every weight's stored size (bytes or values present in the
    file) are checked against each other before anything is converted or
    built, so a damaged or hostile file raises a ValueError or TypeError
    quickly: a file is read only if it is a regular file of at most 2 GiB
    (protobuf's limit for one model), external data is refused by name
    (never read), and the layers built hold at most 8 times the model's size
    plus 64 MiB (parameters in ``dtype`` and the objects themselves), so
    memory and time stay proportional to the file's size.

    Examples
    --------
    >>> layer = fastrnn.LSTM(3, 4, batch_first=True)
    >>> back, = fastrnn.from_onnx(fastrnn.to_onnx(layer))
    >>> back.batch_first
    True
    """
    if other_ops not in ("raise", "ignore"):
        raise ValueError(f"from_onnx: other_ops must be 'raise' or 'ignore', got {other_ops!r}")
    dtype = check_dtype("from_onnx", dtype)
    onnx, numpy_helper = _onnx_module("from_onnx")
    model, size = _onnx_read(model, onnx)
    graph = model.graph
    initializers, counts = {}, {}
    for tensor in graph.initializer:
        initializers.setdefault(tensor.name, tensor)
        counts[tensor.name] = counts.get(tensor.name, 0) + 1
    for sparse in graph.sparse_initializer:
        counts[sparse.values.name] = counts.get(sparse.values.name, 0) + 1

    # 1. check every recurrent node, converting and building nothing
    plans = []
    for index, node in enumerate(graph.node):
        op = _onnx_op(node)
        if op not in _LAYERS:
            if other_ops == "raise" and op not in _ONNX_GLUE_OPS:
                raise ValueError(f"from_onnx: unsupported op {_clip(op)!r} (node "
                                 f"{_onnx_label(node, index)}): fastrnn imports the RNN, GRU "
                                 f"and LSTM nodes; pass other_ops='ignore' to import them and "
                                 f"run the rest of the graph yourself")
            continue
        plans.append(_onnx_plan(index, node, op, initializers, counts, onnx))
    if not plans:
        if not model.graph.node and not model.opset_import:   # (protobuf parses b"" so)
            raise ValueError("from_onnx: the model is empty (no graph, no opset): an empty "
                             "file, or not an ONNX model")
        raise ValueError("from_onnx: the model has no RNN, GRU or LSTM node")
    # 2. the layout of each: layout=1 nodes are batch-first by definition; the
    # others' from the glue around them
    for plan in plans:
        if plan.layout == 1:
            plan.batch_first, plan.layout_reason = True, "layout=1"
    _onnx_layouts(graph, [plan for plan in plans if plan.layout == 0], initializers, counts,
                  onnx, numpy_helper)
    _onnx_check_caller_inputs(graph, plans, initializers, numpy_helper)
    # 3. the memory the layers will take, against the model's size
    need = sum(plan.values() * dtype.itemsize + _ONNX_LAYER_OVERHEAD for plan in plans)
    limit = _ONNX_LAYER_FACTOR * size + _ONNX_LAYER_SLACK
    if need > limit:
        slack = f" plus {_ONNX_LAYER_SLACK / 2**20:.0f} MiB" if _ONNX_LAYER_SLACK else ""
        raise ValueError(f"from_onnx: the {len(plans)} recurrent node"
                         f"{'s' if len(plans) != 1 else ''} would build layers of "
                         f"{need / 2**20:.1f} MiB, more than the limit of {limit / 2**20:.1f} "
                         f"MiB ({_ONNX_LAYER_FACTOR} times the model's size{slack}); "
                         f"nodes sharing weights count them once each")
    # 4. the weights in dtype, all checked finite before any layer is built
    states = []
    for plan in plans:
        inverse = np.argsort(_ONNX_GATES[plan.op])   # ONNX gate order -> PyTorch's
        arrays = {}
        for what, tensor in plan.tensors.items():
            with np.errstate(over="ignore", invalid="ignore"):
                value = numpy_helper.to_array(tensor).astype(dtype)
            if not np.isfinite(value).all():
                raise ValueError(f"{plan.where}: input {what}: non-finite values (NaN or inf) "
                                 f"after conversion to {dtype.name}")
            arrays[what] = value

        def back(a):
            blocks = np.split(a, len(inverse), axis=0)
            return np.concatenate([blocks[i] for i in inverse], axis=0)

        state = {}
        for d, sfx in enumerate(["_l0", "_l0_reverse"][:plan.dirs]):
            state["weight_ih" + sfx] = back(arrays["W"][d])
            state["weight_hh" + sfx] = back(arrays["R"][d])
            if "B" in arrays:
                b_w, b_r = np.split(arrays["B"][d], 2)
                state["bias_ih" + sfx], state["bias_hh" + sfx] = back(b_w), back(b_r)
            if "P" in arrays:   # ONNX's i, o, f -> i, f, o
                state["weight_peephole" + sfx] = np.concatenate(
                    [np.split(arrays["P"][d], 3)[i] for i in np.argsort(_ONNX_PEEPHOLES)])
        states.append(state)
    # 5. the layers
    layers = []
    for plan, state in zip(plans, states):
        layer = _LAYERS[plan.op](plan.input_size, plan.hidden_size,
                                 batch_first=plan.batch_first, dtype=dtype, **plan.kwargs)
        layer.load_state_dict(state)
        layers.append(Reversed(layer) if plan.reverse else layer)
    return layers
