"""Cross-checks against PyTorch CPU: weights copied across, same numbers.

Skipped when torch is missing; .ci/run installs torch==2.13.0 so they run in CI.
"""
import itertools

import numpy as np
import pytest

import fastrnn

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
CLASSES = [("RNN", "tanh"), ("RNN", "relu"), ("GRU", None), ("LSTM", None)]


def pair(name, nonlinearity, D, H, dtype, **kw):
    """A torch module and a fastrnn layer with the same weights."""
    extra = {"nonlinearity": nonlinearity} if nonlinearity else {}
    tmod = getattr(torch.nn, name)(D, H, dtype=TORCH_DTYPES[dtype], **extra, **kw)
    fmod = getattr(fastrnn, name)(D, H, dtype=dtype, **extra, **kw)
    fmod.load_state_dict(tmod.state_dict())  # the PyTorch state_dict loads directly
    return tmod, fmod


def to_np(t):
    return t.detach().numpy()


OPTIONS = list(itertools.product([1, 2], [False, True], [False, True], [True, False],
                                 [False, True]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias,use_lengths", OPTIONS)
@pytest.mark.parametrize("name,nonlinearity", CLASSES)
def test_layer_matches_torch(name, nonlinearity, num_layers, bidirectional, batch_first, bias,
                             use_lengths, dtype, close):
    T, B, D, H = 7, 4, 5, 6
    rng = np.random.default_rng(num_layers * 8 + bidirectional * 4 + batch_first * 2 + bias)
    tmod, fmod = pair(name, nonlinearity, D, H, dtype, num_layers=num_layers,
                      bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((B, T, D) if batch_first else (T, B, D)).astype(dtype)
    h0 = rng.standard_normal((num_layers * dirs, B, H)).astype(dtype)
    c0 = rng.standard_normal((num_layers * dirs, B, H)).astype(dtype)
    hx = (h0, c0) if name == "LSTM" else h0
    t_hx = tuple(map(torch.from_numpy, hx)) if name == "LSTM" else torch.from_numpy(hx)
    lengths = rng.integers(1, T + 1, size=B) if use_lengths else None
    if use_lengths:
        lengths[0] = T  # so that pad_packed_sequence gives back all T steps
    with torch.no_grad():
        if use_lengths:
            packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths),
                                          batch_first=batch_first, enforce_sorted=False)
            t_out, t_state = tmod(packed, t_hx)
            t_out, _ = pad_packed_sequence(t_out, batch_first=batch_first)
        else:
            t_out, t_state = tmod(torch.from_numpy(x), t_hx)
    out, state = fmod(x, hx, lengths=lengths)
    close(out, to_np(t_out), dtype)
    if name == "LSTM":
        close(state[0], to_np(t_state[0]), dtype)
        close(state[1], to_np(t_state[1]), dtype)
    else:
        close(state, to_np(t_state), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,nonlinearity", CLASSES)
def test_unbatched_and_default_state_match_torch(name, nonlinearity, dtype, close):
    tmod, fmod = pair(name, nonlinearity, 3, 4, dtype, num_layers=2, bidirectional=True)
    x = np.random.default_rng(1).standard_normal((6, 3)).astype(dtype)
    with torch.no_grad():
        t_out, t_state = tmod(torch.from_numpy(x))
    out, state = fmod(x)
    close(out, to_np(t_out), dtype)
    t_h = t_state[0] if name == "LSTM" else t_state
    h = state[0] if name == "LSTM" else state
    assert h.shape == (4, 4)
    close(h, to_np(t_h), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("name,nonlinearity", [("RNNCell", "tanh"), ("RNNCell", "relu"),
                                               ("GRUCell", None), ("LSTMCell", None)])
def test_cells_match_torch(name, nonlinearity, batched, bias, dtype, close):
    D, H, B = 5, 7, 3
    extra = {"nonlinearity": nonlinearity} if nonlinearity else {}
    tcell = getattr(torch.nn, name)(D, H, bias=bias, dtype=TORCH_DTYPES[dtype], **extra)
    fcell = getattr(fastrnn, name)(D, H, bias=bias, dtype=dtype, **extra)
    fcell.load_state_dict(tcell.state_dict())
    rng = np.random.default_rng(2)
    shape = (B,) if batched else ()
    x = rng.standard_normal(shape + (D,)).astype(dtype)
    h = rng.standard_normal(shape + (H,)).astype(dtype)
    c = rng.standard_normal(shape + (H,)).astype(dtype)
    hx = (h, c) if name == "LSTMCell" else h
    t_hx = tuple(map(torch.from_numpy, hx)) if name == "LSTMCell" else torch.from_numpy(hx)
    with torch.no_grad():
        expected = tcell(torch.from_numpy(x), t_hx)
        expected_default = tcell(torch.from_numpy(x))
    got, got_default = fcell(x, hx), fcell(x)
    if name == "LSTMCell":
        for g, e in zip(got + got_default, expected + expected_default):
            close(g, to_np(e), dtype)
    else:
        close(got, to_np(expected), dtype)
        close(got_default, to_np(expected_default), dtype)


@pytest.mark.parametrize("name,nonlinearity", CLASSES)
def test_export_to_torch(name, nonlinearity, close):
    """Our state_dict loads into the PyTorch module and gives the same numbers."""
    extra = {"nonlinearity": nonlinearity} if nonlinearity else {}
    fmod = getattr(fastrnn, name)(4, 5, num_layers=2, bidirectional=True, seed=3, **extra)
    tmod = getattr(torch.nn, name)(4, 5, num_layers=2, bidirectional=True, **extra)
    tmod.load_state_dict({k: torch.from_numpy(v) for k, v in fmod.state_dict().items()})
    x = np.random.default_rng(4).standard_normal((6, 2, 4)).astype(np.float32)
    with torch.no_grad():
        t_out, _ = tmod(torch.from_numpy(x))
    close(fmod(x)[0], to_np(t_out), "float32")


def test_torch_tensors_as_inputs(close):
    tmod, fmod = pair("LSTM", None, 3, 4, "float32")
    x = torch.randn(5, 2, 3, requires_grad=True)
    h0, c0 = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    with torch.no_grad():
        t_out, _ = tmod(x, (h0, c0))
    out, _ = fmod(x, (h0, c0), lengths=torch.tensor([5, 5]))
    close(out, to_np(t_out), "float32")


GRAD_OPTIONS = list(itertools.product([1, 2], [False, True], [False, True], [True, False]))


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,use_lengths", GRAD_OPTIONS)
@pytest.mark.parametrize("name,nonlinearity", CLASSES)
def test_gradients_match_torch_autograd(name, nonlinearity, num_layers, bidirectional,
                                        batch_first, use_lengths):
    T, B, D, H = 6, 3, 4, 5
    dtype = "float64"
    rng = np.random.default_rng(num_layers * 4 + bidirectional * 2 + batch_first)
    tmod, fmod = pair(name, nonlinearity, D, H, dtype, num_layers=num_layers,
                      bidirectional=bidirectional, batch_first=batch_first)
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((B, T, D) if batch_first else (T, B, D))
    states = [rng.standard_normal((num_layers * dirs, B, H))
              for _ in range(2 if name == "LSTM" else 1)]
    lengths = rng.integers(1, T + 1, size=B) if use_lengths else None
    if use_lengths:
        lengths[0] = T
    w_out = rng.standard_normal((B, T, dirs * H) if batch_first else (T, B, dirs * H))
    w_states = [rng.standard_normal(s.shape) for s in states]

    tx = torch.tensor(x, requires_grad=True)
    tstates = [torch.tensor(s, requires_grad=True) for s in states]
    t_hx = tuple(tstates) if name == "LSTM" else tstates[0]
    if use_lengths:
        packed = pack_padded_sequence(tx, torch.from_numpy(lengths), batch_first=batch_first,
                                      enforce_sorted=False)
        t_out, t_state = tmod(packed, t_hx)
        t_out, _ = pad_packed_sequence(t_out, batch_first=batch_first)
    else:
        t_out, t_state = tmod(tx, t_hx)
    t_states = t_state if name == "LSTM" else (t_state,)
    loss = (t_out * torch.from_numpy(w_out)).sum() + sum(
        (s * torch.from_numpy(w)).sum() for s, w in zip(t_states, w_states))
    loss.backward()

    hx = tuple(states) if name == "LSTM" else states[0]
    _, backprop = fmod.forward_train(x, hx, lengths=lengths)
    dx, dhx = backprop(w_out, tuple(w_states) if name == "LSTM" else w_states[0])
    tol = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    for got, t in zip(dhx if name == "LSTM" else (dhx,), tstates):
        np.testing.assert_allclose(got, t.grad.numpy(), **tol)
    for pname, param in tmod.named_parameters():
        np.testing.assert_allclose(fmod.grads[pname], param.grad.numpy(), **tol, err_msg=pname)


@pytest.mark.parametrize("name,nonlinearity", [("RNNCell", "tanh"), ("RNNCell", "relu"),
                                               ("GRUCell", None), ("LSTMCell", None)])
def test_cell_gradients_match_torch_autograd(name, nonlinearity):
    extra = {"nonlinearity": nonlinearity} if nonlinearity else {}
    tcell = getattr(torch.nn, name)(4, 5, dtype=torch.float64, **extra)
    fcell = getattr(fastrnn, name)(4, 5, dtype="float64", **extra)
    fcell.load_state_dict(tcell.state_dict())
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4))
    states = [rng.standard_normal((3, 5)) for _ in range(2 if name == "LSTMCell" else 1)]
    weights = [rng.standard_normal((3, 5)) for _ in states]
    tx = torch.tensor(x, requires_grad=True)
    tstates = [torch.tensor(s, requires_grad=True) for s in states]
    t_new = tcell(tx, tuple(tstates) if name == "LSTMCell" else tstates[0])
    t_new = t_new if name == "LSTMCell" else (t_new,)
    sum((s * torch.from_numpy(w)).sum() for s, w in zip(t_new, weights)).backward()
    _, backprop = fcell.forward_train(x, tuple(states) if name == "LSTMCell" else states[0])
    dx, dhx = backprop(tuple(weights) if name == "LSTMCell" else weights[0])
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    for got, t in zip(dhx if name == "LSTMCell" else (dhx,), tstates):
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-10, atol=1e-12)
    for pname, param in tcell.named_parameters():
        np.testing.assert_allclose(fcell.grads[pname], param.grad.numpy(), rtol=1e-10,
                                   atol=1e-12, err_msg=pname)


MODULES = [("RNN", dict(nonlinearity="relu", num_layers=2, bidirectional=True)),
           ("GRU", dict(num_layers=2, batch_first=True, bias=False)),
           ("LSTM", dict(num_layers=3, dropout=0.25, bidirectional=True)),
           ("RNNCell", dict(nonlinearity="tanh")), ("GRUCell", dict(bias=False)),
           ("LSTMCell", dict())]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,kwargs", MODULES)
def test_from_torch_and_back(name, kwargs, dtype, close):
    tmod = getattr(torch.nn, name)(4, 5, dtype=TORCH_DTYPES[dtype], **kwargs).eval()
    fmod = fastrnn.from_torch(tmod)
    assert type(fmod).__name__ == name and fmod.dtype == np.dtype(dtype)
    for key, value in kwargs.items():
        assert getattr(fmod, key) == value
    rng = np.random.default_rng(0)
    cell = name.endswith("Cell")
    x = rng.standard_normal((3, 4) if cell else (6, 3, 4)).astype(dtype)
    with torch.no_grad():
        expected = tmod(torch.from_numpy(x))
    got = fmod(x)
    pick = (lambda r: r[0]) if name in ("LSTMCell",) or not cell else (lambda r: r)
    close(pick(got), pick(expected).numpy(), dtype)
    back = fastrnn.to_torch(fmod)
    assert type(back) is type(tmod)
    for key, value in tmod.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_from_torch_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="dtype torch.float16"):
        fastrnn.from_torch(torch.nn.GRU(4, 5).half())
    with pytest.raises(TypeError, match="from_torch: expected a torch.nn RNN"):
        fastrnn.from_torch(torch.nn.Linear(4, 5))
    with pytest.raises(TypeError, match="to_torch: expected a fastrnn RNN"):
        fastrnn.to_torch(fastrnn.Linear(4, 5))
    # a PyTorch module where a fastrnn one belongs, and PyTorch's other LSTMs
    for module in (torch.nn.LSTM(3, 4), torch.nn.GRUCell(3, 4)):
        with pytest.raises(TypeError, match=r"to_torch: expected a fastrnn RNN, GRU, LSTM or "
                                            r"cell, got torch\.nn\.modules\.rnn\."):
            fastrnn.to_torch(module)
    with pytest.raises(TypeError, match=r"from_torch: expected a torch.nn RNN, .* got "
                                        r"torch\.ao\.nn\.quantizable\.modules\.rnn\.LSTM"):
        fastrnn.from_torch(torch.ao.nn.quantizable.LSTM(3, 4))
    for module in (fastrnn.GRU(3, 4, reset_after=False), fastrnn.GRUCell(3, 4, reset_after=False)):
        with pytest.raises(ValueError, match="to_torch: GRU(Cell)? has reset_after=False"):
            fastrnn.to_torch(module)


def test_from_torch_refuses_what_changes_the_computation_out_of_sight():
    """A forward hook, a forward pre-hook (float or dynamically quantized
    module), a subclass whose forward is its own, or parameters of several
    dtypes: each changes what the module computes, and converting dropped
    it (outputs 0.4-1.0 away from torch's). A subclass that keeps torch's
    forward converts."""
    def double(module, inputs, output):
        return output[0] * 2, output[1]

    lstm = torch.nn.LSTM(3, 4)
    handle = lstm.register_forward_hook(double)
    with pytest.raises(ValueError, match=r"from_torch: LSTM has a forward hook \(.*double\)"):
        fastrnn.from_torch(lstm)
    handle.remove()
    fastrnn.from_torch(lstm)
    gru = torch.nn.GRU(3, 4)
    gru.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))
    with pytest.raises(ValueError, match="from_torch: GRU has a forward pre-hook"):
        fastrnn.from_torch(gru)
    quantized = torch.ao.quantization.quantize_dynamic(torch.nn.LSTM(3, 4), {torch.nn.LSTM},
                                                       dtype=torch.qint8)
    quantized.register_forward_hook(double)
    with pytest.raises(ValueError, match="from_torch: LSTM has a forward hook"):
        fastrnn.from_torch(quantized)

    class LSTM(torch.nn.LSTM):   # named as torch's, computing something else
        def forward(self, x, hx=None):
            out, state = super().forward(x, hx)
            return out * 2, state

    with pytest.raises(TypeError, match=r"from_torch: .*LSTM overrides torch\.nn\.LSTM\.forward"):
        fastrnn.from_torch(LSTM(3, 4))

    class Named(torch.nn.GRU):   # torch's forward: converts
        pass

    module = Named(3, 4).eval()
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(fastrnn.from_torch(module)(x)[0], expected, rtol=0, atol=1e-6)

    mixed = torch.nn.GRU(3, 4).double()
    mixed.weight_ih_l0.data = mixed.weight_ih_l0.data.float()
    with pytest.raises(ValueError, match=r"from_torch: GRU's parameters are of several dtypes "
                                         r"\(weight_ih_l0 torch.float32, weight_hh_l0 "
                                         r"torch.float64"):
        fastrnn.from_torch(mixed)


def test_from_torch_reads_the_parameters_and_refuses_what_else_a_call_runs():
    """The weights come from the parameters (a state-dict hook that changed
    them went through: 0.43 from torch's outputs); a parametrization or an
    extra parameter is refused by from_torch, a subclass redefining what a
    call runs (__call__, permute_hidden) or a global forward hook too."""
    module = torch.nn.LSTM(3, 4).eval()

    def zeroed(mod, state, prefix, local_metadata):
        for key in state:
            state[key] = torch.zeros_like(state[key])

    module._register_state_dict_hook(zeroed)
    x = np.random.default_rng(3).standard_normal((5, 2, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(fastrnn.from_torch(module)(x)[0], expected, rtol=0, atol=1e-6)

    import torch.nn.utils.parametrize as parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    module = torch.nn.LSTM(3, 4)
    parametrize.register_parametrization(module, "weight_hh_l0", Double())
    with pytest.raises(ValueError, match=r"from_torch: LSTM holds the parameters "
                                         r"\['parametrizations.weight_hh_l0.original'\] in place "
                                         r"of \['weight_hh_l0'\]"):
        fastrnn.from_torch(module)

    class Extra(torch.nn.GRU):
        def __init__(self, *args):
            super().__init__(*args)
            self.scale = torch.nn.Parameter(torch.ones(1))

    with pytest.raises(ValueError, match=r"from_torch: GRU holds parameters torch.nn.GRU has "
                                         r"not: \['scale'\]"):
        fastrnn.from_torch(Extra(3, 4))
    for method in ("__call__", "permute_hidden"):
        sub = type("Sub", (torch.nn.LSTM,), {method: lambda self, *a, **k: None})
        with pytest.raises(TypeError, match=rf"overrides torch\.nn\.LSTM\.{method}"):
            fastrnn.from_torch(sub(3, 4))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(ValueError, match=r"from_torch: every module \(global\) has a forward "
                                             r"hook"):
            fastrnn.from_torch(torch.nn.GRU(3, 4))
    finally:
        handle.remove()


def test_from_torch_reads_the_rnn_mode_its_forward_uses():
    """nn.RNN's forward computes by ``mode``, fixed at construction;
    ``nonlinearity`` set afterwards changes nothing there (a relu RNN came
    out of a tanh one, outputs 1.0 apart)."""
    module = torch.nn.RNN(3, 4).eval()
    module.nonlinearity = "relu"
    x = np.random.default_rng(1).standard_normal((6, 2, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    converted = fastrnn.from_torch(module)
    assert converted.nonlinearity == "tanh"
    np.testing.assert_allclose(converted(x)[0], expected, rtol=0, atol=1e-6)


def test_to_torch_gives_an_eval_module_and_its_refusals_point_where_export_works():
    """The module comes in eval mode (its stacked dropout off, as fastrnn's
    call), so it gives the layer's numbers; a refusal suggests to_onnx only
    where to_onnx takes the layer (not for cells, zoneout or proj_size).
    from_torch's refusal of a torch option says from_torch."""
    layer = fastrnn.LSTM(3, 4, num_layers=2, dropout=0.5, seed=0)
    module = fastrnn.to_torch(layer)
    assert not module.training
    x = np.random.default_rng(2).standard_normal((5, 2, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(layer(x)[0], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"peepholes=True; PyTorch has no such option "
                                         r"\(export it with to_onnx instead\)"):
        fastrnn.to_torch(fastrnn.LSTM(3, 4, peepholes=True))
    for layer in (fastrnn.LSTMCell(3, 4, peepholes=True),
                  fastrnn.GRUCell(3, 4, reset_after=False),
                  fastrnn.GRU(3, 4, zoneout=0.1)):
        with pytest.raises(ValueError, match="to_torch") as info:
            fastrnn.to_torch(layer)
        assert "to_onnx" not in str(info.value)
    with pytest.raises(ValueError, match=r"from_torch: GRU does not convert: .*dropout"):
        fastrnn.from_torch(torch.nn.GRU(3, 4, num_layers=2, dropout=1.0))


def test_to_torch_takes_options_given_at_what_pytorch_computes():
    """An LSTM's cell_activation given as its activation ('tanh') is the
    default's arithmetic: to_torch converts it (it was refused as an option
    PyTorch lacks), and a cell_activation that differs is still refused."""
    x = np.random.default_rng(3).standard_normal((5, 2, 3)).astype(np.float32)
    for layer in (fastrnn.LSTM(3, 4, cell_activation="tanh", activation="tanh", seed=0),
                  fastrnn.LSTMCell(3, 4, cell_activation="tanh", seed=0)):
        module = fastrnn.to_torch(layer)
        with torch.no_grad():
            got = module(torch.from_numpy(x if layer.__class__ is fastrnn.LSTM else x[0]))
        expected = layer(x if layer.__class__ is fastrnn.LSTM else x[0])
        np.testing.assert_allclose(got[0].numpy(), expected[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cell_activation='sigmoid'; PyTorch has no such"):
        fastrnn.to_torch(fastrnn.LSTM(3, 4, cell_activation="sigmoid"))


def test_a_packed_sequence_is_refused_with_what_to_pass_instead():
    # (numpy's "inhomogeneous shape" TypeError named no way out)
    x = torch.randn(5, 2, 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    with pytest.raises(TypeError, match=r"LSTM: input is a torch PackedSequence; pass the "
                                        r"padded tensor .* with lengths= instead"):
        fastrnn.LSTM(3, 4)(packed)


def test_lazily_negated_or_conjugated_tensors_are_their_values():
    # torch's RuntimeError "Can't call numpy() on Tensor that has negative
    # bit set" escaped, from a call and from load_state_dict alike
    module = torch.nn.GRU(3, 4)
    layer = fastrnn.from_torch(module)
    x = torch.randn(5, 2, 3, dtype=torch.complex64).conj().imag   # a real tensor, negated lazily
    assert x.is_neg()
    np.testing.assert_allclose(layer(x)[0], module(x)[0].detach().numpy(), rtol=0, atol=1e-6)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["bias_hh_l0"] = torch.complex(torch.zeros(12), -state["bias_hh_l0"]).conj().imag
    assert state["bias_hh_l0"].is_neg()
    layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.bias_hh_l0, module.bias_hh_l0.detach().numpy())
    # a conjugated complex tensor meets the complex dtype's TypeError, like any complex one
    with pytest.raises(TypeError, match="GRU: input must have a real numeric dtype, got complex64"):
        layer(torch.randn(5, 2, 3, dtype=torch.complex64).conj())


def test_a_complex32_tensor_is_refused_as_any_complex_one():
    """torch.complex32 has no numpy dtype: it was converted with .double(),
    which drops the imaginary part (a warning from torch, the real part's
    results from fastrnn), in calls and in load_state_dict alike."""
    layer = fastrnn.GRU(3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.complex64).to(torch.complex32)
    with pytest.raises(TypeError, match="GRU: input must have a real numeric dtype, got "
                                        "torch.complex32"):
        layer(x)
    state = {k: torch.tensor(v).to(torch.complex32) for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match="torch.complex32"):
        layer.load_state_dict(state)


def test_sparse_and_nested_tensors_are_refused_with_what_to_pass_instead():
    with pytest.raises(TypeError, match=r"GRU: input is a torch tensor of layout "
                                        r"torch\.sparse_coo; pass its \.to_dense\(\)"):
        fastrnn.GRU(3, 4)(torch.randn(5, 2, 3).to_sparse())
    nested = torch.nested.nested_tensor([torch.randn(5, 3), torch.randn(2, 3)])
    with pytest.raises(TypeError, match=r"GRU: input is a torch nested tensor; pass its "
                                        r"\.to_padded_tensor\(0\.0\) with lengths= instead"):
        fastrnn.GRU(3, 4, batch_first=True)(nested)


def test_torch_dtypes_name_the_dtype():
    # ported code passes dtype=torch.float64 (it was refused as not a dtype)
    for cls in (fastrnn.LSTM, fastrnn.GRUCell, fastrnn.Linear):
        for dt, expected in ((torch.float64, np.float64), (torch.float32, np.float32)):
            weights = cls(3, 4, dtype=dt).state_dict().values()
            assert {w.dtype for w in weights} == {np.dtype(expected)}
    with pytest.raises(ValueError, match=r"LSTM: dtype must be 'float32' or 'float64', "
                                         r"got torch\.float16"):
        fastrnn.LSTM(3, 4, dtype=torch.float16)


def test_from_torch_refuses_a_forward_replaced_on_the_instance_and_a_bad_nonlinearity():
    """A forward set on the instance (a monkey patch, accelerate's hooks)
    changes the computation as a subclass's does; an RNNCell whose
    nonlinearity was set to what torch cannot run (it raises) is refused
    rather than converted to fastrnn's gate option of that name."""
    gru = torch.nn.GRU(3, 4)
    forward = gru.forward
    gru.forward = lambda x, hx=None: forward(2 * x, hx)
    with pytest.raises(TypeError, match=r"from_torch: .*GRU replaces on the instance "
                                        r"torch\.nn\.GRU\.forward"):
        fastrnn.from_torch(gru)
    del gru.forward
    fastrnn.from_torch(gru)
    cell = torch.nn.RNNCell(3, 4)
    cell.nonlinearity = "sigmoid"
    with pytest.raises(ValueError, match="from_torch: RNNCell has nonlinearity='sigmoid'; "
                                         "expected 'tanh' or 'relu'"):
        fastrnn.from_torch(cell)
