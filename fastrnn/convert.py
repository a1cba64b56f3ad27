"""Conversions between fastrnn and other frameworks' recurrent modules.

PyTorch: ``from_torch(module)`` builds the fastrnn layer or cell equivalent
to a ``torch.nn.RNN/GRU/LSTM/RNNCell/GRUCell/LSTMCell`` (configuration and
weights; the names and layouts are the same), ``to_torch(layer)`` the
reverse. Keras 3: ``from_keras(layer)`` for SimpleRNN, GRU (either
reset_after), LSTM and Bidirectional. ONNX: ``to_onnx`` / ``from_onnx``. The frameworks are imported only when called.
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
    if not cfg.pop("reset_after", True):
        raise ValueError(f"to_torch: {name} has reset_after=False; PyTorch has only the "
                         f"reset-after GRU (export it with to_onnx instead)")
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
    if kind not in ("SimpleRNN", "GRU", "LSTM"):
        raise TypeError(f"from_keras: expected a Keras SimpleRNN, GRU or LSTM inside, got {kind}")
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
    reset_after = kind != "GRU" or bool(cfg.get("reset_after", True))
    if bias is not None:
        if kind == "GRU" and reset_after:  # (2, 3U): input and recurrent biases
            params["bias_ih"], params["bias_hh"] = reorder(bias[0]), reorder(bias[1])
        else:              # one bias: PyTorch's two summed
            params["bias_ih"], params["bias_hh"] = reorder(bias), np.zeros_like(bias)
    name = {"SimpleRNN": "RNN", "GRU": "GRU", "LSTM": "LSTM"}[kind]
    config = {"input_size": kernel.shape[0], "hidden_size": units, "bias": bias is not None,
              "return_sequences": cfg["return_sequences"]}
    if kind == "GRU":
        config["reset_after"] = reset_after
    return name, params, config


def from_keras(layer, dtype="float32"):
    """A fastrnn layer equal to a Keras 3 SimpleRNN, GRU (``reset_after`` True
    or False, kept), LSTM, or Bidirectional(merge_mode='concat') of one of them.

    The result is batch-first, as Keras is. It computes what the Keras layer
    computes: for ``return_sequences=True`` the fastrnn layer itself; for
    ``return_sequences=False`` (the last step only) a
    ``Sequential([layer, LastStep(bidirectional=...)])``.
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
    options = {"reset_after": config["reset_after"]} if name == "GRU" else {}
    result = _LAYERS[name](config["input_size"], config["hidden_size"], bias=config["bias"],
                           batch_first=True, bidirectional=kind == "Bidirectional",
                           dtype=dtype, **options)
    result.load_state_dict({f"{key}_l0{sfx}": value for sfx, params in parts
                            for key, value in params.items()})
    if not config["return_sequences"]:
        from fastrnn.model import Sequential
        from fastrnn.nn import LastStep
        return Sequential([result, LastStep(bidirectional=kind == "Bidirectional")])
    return result


# --- ONNX --------------------------------------------------------------------------
# gate blocks from PyTorch's order to ONNX's: LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h
_ONNX_GATES = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}
# ops that only move, slice or reshape tensors between recurrent nodes (the
# glue of stacked or exported models); any other op computes something that
# the returned layers would not, so from_onnx refuses it unless told otherwise
_ONNX_GLUE_OPS = {"Transpose", "Reshape", "Slice", "Squeeze", "Unsqueeze", "Concat", "Identity",
                  "Constant", "ConstantOfShape", "Shape", "Gather", "Cast", "Expand", "Split"}


def to_onnx(layer, path=None, lengths=False, opset=17):
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

    Parameters
    ----------
    layer : fastrnn RNN, GRU or LSTM
    path : str or path-like, optional; where to save the model as well
    lengths : bool, default False; add the ``sequence_lens`` input
    opset : int, default 17

    Returns
    -------
    onnx.ModelProto
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise ImportError("fastrnn: to_onnx needs the onnx package (pip install onnx)") from None
    kind = type(layer).__name__
    if kind not in _LAYERS:
        raise TypeError(f"to_onnx: expected a fastrnn RNN, GRU or LSTM, got {kind}")
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
        if kind == "RNN":
            attrs["activations"] = ["Relu" if cfg["nonlinearity"] == "relu" else "Tanh"] * dirs
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


def from_onnx(model, dtype="float32", other_ops="raise"):
    """fastrnn layers for the RNN, GRU and LSTM nodes of an ONNX model.

    Returns a list with one single-layer fastrnn layer per recurrent node, in
    graph order, time-major (ONNX's layout 0). Ops that only move tensors
    (Transpose, Reshape, Slice, Concat, ...) may sit between them; any other
    op (a Gemm head, an activation) raises a ValueError naming it, since the
    layers alone would not compute the model, unless ``other_ops="ignore"``
    (then the caller runs those parts). Every attribute is honoured or
    refused with a ValueError naming it: peepholes (P), ``clip``,
    ``input_forget``, activations other than the defaults (Relu for RNN is
    fine), direction "reverse" alone, ``layout=1``; weights must be initializers.

    Parameters
    ----------
    model : onnx.ModelProto, or a path to an .onnx file
    dtype : {'float32', 'float64'}, default 'float32'
    other_ops : {'raise', 'ignore'}, default 'raise'
    """
    if other_ops not in ("raise", "ignore"):
        raise ValueError(f"from_onnx: other_ops must be 'raise' or 'ignore', got {other_ops!r}")
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise ImportError("fastrnn: from_onnx needs the onnx package (pip install onnx)") from None
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(model)
        except Exception as exc:  # onnx raises several kinds for a damaged file
            raise ValueError(f"from_onnx: cannot read an ONNX model from {model!r}: "
                             f"{exc}") from None
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in _LAYERS:
            if other_ops == "raise" and node.op_type not in _ONNX_GLUE_OPS:
                raise ValueError(f"from_onnx: unsupported op {node.op_type!r} (node "
                                 f"{node.name or node.output[0]!r}): fastrnn imports the RNN, "
                                 f"GRU and LSTM nodes; pass other_ops='ignore' to import them "
                                 f"and run the rest of the graph yourself")
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        where = f"from_onnx: {node.op_type} node {node.name or node.output[0]!r}"

        def refuse(what, why):
            raise ValueError(f"{where}: {what}: {why}")

        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("forward", "bidirectional"):
            refuse(f"direction={direction!r}", "fastrnn runs 'forward' or 'bidirectional'")
        if attrs.get("layout", 0) != 0:
            refuse("layout=1", "batch-first ONNX nodes are not supported (ORT rejects them too)")
        if "clip" in attrs:
            refuse(f"clip={attrs['clip']}", "cell clipping is not implemented")
        if attrs.get("input_forget", 0):
            refuse("input_forget=1", "coupled input/forget gates are not implemented")
        if node.op_type == "GRU" and attrs.get("linear_before_reset", 0) not in (0, 1):
            refuse(f"linear_before_reset={attrs['linear_before_reset']}", "must be 0 or 1")
        dirs = 2 if direction == "bidirectional" else 1
        names = [a.decode() if isinstance(a, bytes) else a
                 for a in attrs.get("activations", [])]
        defaults = {"RNN": [["Tanh"], ["Relu"]], "GRU": [["Sigmoid", "Tanh"]],
                    "LSTM": [["Sigmoid", "Tanh", "Tanh"]]}[node.op_type]
        nonlinearity = "tanh"
        if names:
            per_dir = len(names) // dirs
            groups = [names[i * per_dir:(i + 1) * per_dir] for i in range(dirs)]
            if any(g != groups[0] for g in groups) or groups[0] not in defaults:
                refuse(f"activations={names}", "fastrnn implements "
                       f"{' or '.join(str(d) for d in defaults)} per direction")
            if groups[0] == ["Relu"]:
                nonlinearity = "relu"
        if attrs.get("activation_alpha") or attrs.get("activation_beta"):
            refuse("activation_alpha/beta", "parametrised activations are not implemented")
        inputs = list(node.input) + [""] * (8 - len(node.input))
        if node.op_type == "LSTM" and inputs[7]:
            refuse("P (peepholes)", "peephole connections are not implemented")
        for i, what in ((1, "W"), (2, "R"), (3, "B")):
            if inputs[i] and inputs[i] not in weights:
                refuse(what, f"{inputs[i]!r} is not an initializer; fastrnn imports constant "
                       f"weights")
        W, R = weights[inputs[1]], weights[inputs[2]]
        H = int(attrs.get("hidden_size", R.shape[-1]))
        inverse = np.argsort(_ONNX_GATES[node.op_type])   # ONNX gate order -> PyTorch's

        def back(a):
            blocks = np.split(a, len(inverse), axis=0)
            return np.concatenate([blocks[i] for i in inverse], axis=0)

        kwargs = {"bidirectional": dirs == 2, "bias": bool(inputs[3]), "dtype": dtype}
        if node.op_type == "RNN":
            kwargs["nonlinearity"] = nonlinearity
        if node.op_type == "GRU":   # ONNX's default is reset before (0)
            kwargs["reset_after"] = attrs.get("linear_before_reset", 0) == 1
        layer = _LAYERS[node.op_type](W.shape[-1], H, **kwargs)
        state = {}
        for d, sfx in enumerate(["_l0", "_l0_reverse"][:dirs]):
            state["weight_ih" + sfx] = back(W[d])
            state["weight_hh" + sfx] = back(R[d])
            if inputs[3]:
                b_w, b_r = np.split(weights[inputs[3]][d], 2)
                state["bias_ih" + sfx], state["bias_hh" + sfx] = back(b_w), back(b_r)
        layer.load_state_dict(state)
        layers.append(layer)
    if not layers:
        raise ValueError("from_onnx: the model has no RNN, GRU or LSTM node")
    return layers
