"""The training toolkit: losses, Linear / Dropout / activations / LastStep,
optimizers, gradient clipping, learning-rate schedules and Sequential
(fit, callbacks, save / load).

Values and gradients are checked against PyTorch (skipped when torch is
missing) and against central finite differences in float64.
"""
import json
import math
import os
import warnings

import numpy as np
import pytest

import fastrnn
from fastrnn import optim
from interleave import run_interleaved
from reference import numeric_grad

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - CI installs torch
    torch = F = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

RTOL = {"float32": 1e-6, "float64": 1e-10}


def assert_rel(got, ref, rtol, what=""):
    """max |got - ref| <= rtol * max |ref| (shapes must match)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-300)
    err = float(np.abs(got - ref).max(initial=0.0))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x scale {scale:.3g}"


def tt(a, grad=False):
    """A torch tensor holding a copy of a."""
    return torch.tensor(np.array(a), requires_grad=grad)



def assert_fd(analytic, numeric, what="", tol=1e-7):
    """Analytic gradient against central differences, relative to the largest entry."""
    assert analytic.shape == numeric.shape
    scale = max(1e-2, float(np.abs(numeric).max()))  # central differences: ~1e-10 noise
    err = float(np.abs(analytic - numeric).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


# =====================================================================================
# 1. Losses
# =====================================================================================
def _torch_value_grad(fn, pred, *args, **kw):
    p = tt(pred, grad=True)
    value = fn(p, *args, **kw)
    value.backward()
    return value.item(), p.grad.numpy()


def _check_loss(loss, pred, target, fn, rtol, *args, **kw):
    value, grad = loss.value_and_grad(pred, target)
    assert isinstance(value, float)
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert loss(pred, target) == value
    ref_value, ref_grad = _torch_value_grad(fn, pred, *args, **kw)
    assert_rel(value, ref_value, rtol, "value")
    assert_rel(grad, ref_grad, rtol, "grad")


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(7,), (4, 3), (3, 5, 2)])
def test_mse_and_l1_match_torch(dtype, shape):
    rng = np.random.default_rng(len(shape))
    pred = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    target.flat[0] = pred.flat[0]  # a tie: the L1 gradient there is sign(0) = 0
    _check_loss(fastrnn.MSELoss(), pred, target, lambda p: F.mse_loss(p, tt(target)),
                RTOL[dtype])
    _check_loss(fastrnn.L1Loss(), pred, target, lambda p: F.l1_loss(p, tt(target)),
                RTOL[dtype])
    assert fastrnn.L1Loss().value_and_grad(pred, target)[1].flat[0] == 0


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("delta", [0.3, 1.0, 2.5])
def test_huber_matches_torch(dtype, delta):
    rng = np.random.default_rng(int(delta * 10))
    pred = (3 * rng.standard_normal((4, 6, 2))).astype(dtype)
    target = rng.standard_normal((4, 6, 2)).astype(dtype)
    d = np.abs(pred - target)
    assert (d < delta).any() and (d > delta).any()  # both branches are exercised
    _check_loss(fastrnn.HuberLoss(delta), pred, target,
                lambda p: F.huber_loss(p, tt(target), delta=delta), RTOL[dtype])


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_per_sequence_matches_torch(dtype):
    rng = np.random.default_rng(0)
    pred = (2 * rng.standard_normal((6, 5))).astype(dtype)
    target = rng.integers(0, 5, size=6)
    _check_loss(fastrnn.CrossEntropyLoss(), pred, target,
                lambda p: F.cross_entropy(p, tt(target)), RTOL[dtype])


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_cross_entropy_per_step_with_ignored_steps_matches_torch(dtype, ignore_index):
    rng = np.random.default_rng(1)
    B, T, C = 3, 7, 4
    pred = (2 * rng.standard_normal((B, T, C))).astype(dtype)
    target = rng.integers(0, C, size=(B, T))
    target[0, 4:] = ignore_index  # padded steps
    target[2, 6] = ignore_index
    loss = fastrnn.CrossEntropyLoss(ignore_index=ignore_index)
    # torch puts the classes on axis 1
    _check_loss(loss, pred, target,
                lambda p: F.cross_entropy(p.transpose(1, 2), tt(target),
                                          ignore_index=ignore_index), RTOL[dtype])
    grad = loss.value_and_grad(pred, target)[1]
    assert (grad[target == ignore_index] == 0).all()


def test_cross_entropy_every_target_ignored_is_zero():
    pred = np.random.default_rng(2).standard_normal((2, 3, 4))
    value, grad = fastrnn.CrossEntropyLoss().value_and_grad(pred, np.full((2, 3), -100))
    assert value == 0.0 and grad.shape == pred.shape and not grad.any()


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("pos_weight", [None, 2.5, [0.5, 1.0, 3.0]])
def test_bce_with_logits_matches_torch(dtype, pos_weight):
    rng = np.random.default_rng(3)
    pred = (3 * rng.standard_normal((4, 5, 3))).astype(dtype)
    target = rng.random((4, 5, 3)).astype(dtype)
    target[0] = np.round(target[0])  # hard and soft labels
    pw = None if pos_weight is None else torch.tensor(np.asarray(pos_weight, dtype))
    _check_loss(fastrnn.BCEWithLogitsLoss(pos_weight=pos_weight), pred, target,
                lambda p: F.binary_cross_entropy_with_logits(p, tt(target), pos_weight=pw),
                RTOL[dtype])


def test_bce_pos_weight_must_broadcast_within_pred():
    pred = np.zeros((4, 3))
    for bad in ([1.0, 2.0], np.ones((2, 1, 3))):
        with pytest.raises(ValueError, match=r"BCEWithLogitsLoss: pos_weight of shape "
                                             r"\([0-9, ]+\) does not broadcast over pred of "
                                             r"shape \(4, 3\) without growing it"):
            fastrnn.BCEWithLogitsLoss(pos_weight=bad).value_and_grad(pred, pred)
    for good in (2.0, [1.0, 2.0, 3.0], np.ones((4, 1)), np.ones((1, 3))):
        _, grad = fastrnn.BCEWithLogitsLoss(pos_weight=good).value_and_grad(pred, pred)
        assert grad.shape == pred.shape


def _loss_cases(rng):
    pred = rng.standard_normal((3, 4, 3))
    target = rng.standard_normal((3, 4, 3))
    target[np.abs(pred - target) < 0.05] += 0.2  # away from the L1 / Huber kinks
    classes = rng.integers(0, 3, size=(3, 4))
    classes[1, 2:] = -100
    soft = rng.random((3, 4, 3))
    return [(fastrnn.MSELoss(), pred, target), (fastrnn.L1Loss(), pred, target),
            (fastrnn.HuberLoss(0.7), pred, target), (fastrnn.CrossEntropyLoss(), pred, classes),
            (fastrnn.BCEWithLogitsLoss(pos_weight=[1.0, 2.0, 0.5]), pred, soft)]


@pytest.mark.parametrize("case", range(5))
def test_loss_gradients_match_finite_differences(case):
    rng = np.random.default_rng(10 + case)
    loss, pred, target = _loss_cases(rng)[case]
    pred = pred.copy()
    analytic = loss.value_and_grad(pred, target)[1]
    numeric = numeric_grad(lambda: loss(pred, target), pred)
    assert_fd(analytic, numeric, repr(loss))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_losses_extreme_logits_stay_finite(dtype):
    pred = np.array([[1e3, -1e3, 0.0], [-1e3, 1e3, 5.0]], dtype)
    value, grad = fastrnn.CrossEntropyLoss().value_and_grad(pred, np.array([1, 1]))
    # sample 0: log-softmax of the class at -1e3 is -2e3; sample 1: ~0
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert value == pytest.approx(1000.0, rel=1e-6)
    assert_rel(grad, [[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], 1e-6, "CE grad")
    target = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.5]], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # see test_bce_no_overflow_warning
        value, grad = fastrnn.BCEWithLogitsLoss(pos_weight=2.0).value_and_grad(pred, target)
    assert np.isfinite(value) and np.isfinite(grad).all()
    # per element: 1e3 (y=0,x=1e3), 2*1e3 (y=1,x=-1e3), 2*log2 (x=0,y=1), -1e3 terms...
    x, y, w = pred.astype(np.float64), target.astype(np.float64), 2.0
    ref = (1 - y) * x + (1 + (w - 1) * y) * np.logaddexp(0, -x)
    assert value == pytest.approx(ref.mean(), rel=1e-6)


def test_bce_no_overflow_warning():
    pred = np.array([1e3, -1e3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastrnn.BCEWithLogitsLoss().value_and_grad(pred, np.array([0.0, 1.0]))


def test_bce_refuses_targets_outside_zero_one_where_they_count():
    """[failed before] A target of 2 or -0.5 (labels coded -1/1, a count)
    gave a negative loss and trained on it, silently. A padded step's or a
    row's of sample weight 0 does not count: any value is taken there
    (labels padded with -1 under a mask)."""
    pred = np.zeros((2, 3))
    loss = fastrnn.BCEWithLogitsLoss()
    for bad in (2.0, -0.5):
        target = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, bad]])
        with pytest.raises(ValueError, match=rf"BCEWithLogitsLoss: target must lie in \[0, 1\] "
                                             rf"\(0/1 labels or probabilities\), got {bad!r} "
                                             rf"among the targets that count"):
            loss.value_and_grad(pred, target)
    value, _ = loss.value_and_grad(pred, np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.25]]))
    assert value == pytest.approx(np.log(2))
    if torch is not None:   # a target that requires grad converts as any other
        target = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.25]], requires_grad=True)
        assert loss.value_and_grad(pred, target)[0] == value
    x = np.random.default_rng(0).standard_normal((4, 5, 2)).astype(np.float32)
    model = fastrnn.Sequential([fastrnn.GRU(2, 3, batch_first=True, seed=0), fastrnn.LastStep()])
    model.compile(loss="bce_with_logits", optimizer="sgd")
    with pytest.raises(ValueError, match="target must lie in"):
        model.fit(x, -np.ones((4, 3), np.float32), verbose=0)
    # a weightless row's -1 labels: trained on the others as with any value there
    y = np.ones((4, 3), np.float32)
    weights = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    losses = []
    for fill in (-1.0, 0.5):
        y[1] = fill
        model = fastrnn.Sequential([fastrnn.GRU(2, 3, batch_first=True, seed=0),
                                    fastrnn.LastStep()])
        model.compile(loss="bce_with_logits", optimizer="sgd")
        losses.append(model.fit(x, y, sample_weight=weights, epochs=2, verbose=0,
                                shuffle=False).history["loss"])
    assert losses[0] == losses[1]
    # per-step labels padded with -1 where the steps are masked (Embedding's zeros)
    ids = np.array([[3, 1, 2, 0, 0], [2, 2, 0, 0, 0]])
    labels = np.where(ids > 0, 1.0, -1.0)[..., None].astype(np.float32)
    tagger = fastrnn.Sequential([fastrnn.Embedding(4, 2, mask_zero=True, seed=0),
                                 fastrnn.GRU(2, 1, batch_first=True, seed=0)])
    tagger.compile(loss="bce_with_logits", optimizer="sgd")
    assert np.isfinite(tagger.fit(ids, labels, verbose=0).history["loss"][0])
    labels[0, 0] = -1.0   # a step that counts
    with pytest.raises(ValueError, match="got -1.0 among the targets that count"):
        tagger.fit(ids, labels, verbose=0)


def test_loss_errors():
    with pytest.raises(ValueError, match="MSELoss: pred and target must have the same shape"):
        fastrnn.MSELoss()(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="HuberLoss: pred and target must have the same shape"):
        fastrnn.HuberLoss()(np.zeros((2, 3)), np.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match="BCEWithLogitsLoss: pred and target"):
        fastrnn.BCEWithLogitsLoss()(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError, match="CrossEntropyLoss: target must hold integer class"):
        fastrnn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: target classes must lie in \[0, 2\]"):
        fastrnn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="CrossEntropyLoss: target classes must lie"):
        fastrnn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([-1, 0]))
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: expected pred of shape \(\.\.\., C\)"):
        fastrnn.CrossEntropyLoss()(np.zeros((2, 5, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="CrossEntropyLoss: expected pred of shape"):
        fastrnn.CrossEntropyLoss()(np.zeros(()), np.array(0))
    with pytest.raises(TypeError, match="CrossEntropyLoss: ignore_index must be an int"):
        fastrnn.CrossEntropyLoss(ignore_index=-1.0)
    for loss in (fastrnn.MSELoss(), fastrnn.L1Loss(), fastrnn.HuberLoss(),
                 fastrnn.BCEWithLogitsLoss()):
        with pytest.raises(ValueError, match=f"{type(loss).__name__}: got empty"):
            loss(np.zeros((0, 3)), np.zeros((0, 3)))
    for delta in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="HuberLoss: delta must be a positive number"):
            fastrnn.HuberLoss(delta)
    for delta in ("1", True, None):
        with pytest.raises(TypeError, match="HuberLoss: delta must be a positive number"):
            fastrnn.HuberLoss(delta)
    with pytest.raises(ValueError, match="loss must be a fastrnn loss"):
        fastrnn.Sequential([fastrnn.Linear(1, 1)]).compile(loss="hinge")


def test_cross_entropy_empty_input_raises():
    with pytest.raises(ValueError, match="empty"):
        fastrnn.CrossEntropyLoss()(np.zeros((0, 3)), np.zeros(0, np.int64))


# =====================================================================================
# 2. Linear
# =====================================================================================
def _torch_linear(lin):
    t = torch.nn.Linear(lin.in_features, lin.out_features, bias="bias" in lin.state_dict(),
                        dtype=torch.float64 if lin.dtype == np.float64 else torch.float32)
    t.load_state_dict({k: torch.from_numpy(v) for k, v in lin.state_dict().items()})
    return t


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(5,), (4, 5), (3, 6, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_matches_torch(dtype, shape, bias):
    lin = fastrnn.Linear(5, 3, bias=bias, dtype=dtype, seed=1)
    x = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    y = lin(x)
    assert y.dtype == np.dtype(dtype) and y.shape == shape[:-1] + (3,)
    with torch.no_grad():
        ref = _torch_linear(lin)(torch.from_numpy(x)).numpy()
    assert_rel(y, ref, RTOL[dtype])
    assert np.array_equal(lin._seq_infer(x), y)


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(5,), (4, 5), (3, 6, 5)])
def test_linear_backprop_matches_torch_autograd(dtype, shape):
    rng = np.random.default_rng(3)
    lin = fastrnn.Linear(5, 3, dtype=dtype, seed=4)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape[:-1] + (3,)).astype(dtype)
    y, backprop = lin._seq_train(x)
    assert np.array_equal(y, lin(x))
    dx = backprop(dy)
    tlin = _torch_linear(lin)
    tx = tt(x, grad=True)
    (tlin(tx) * torch.from_numpy(dy)).sum().backward()
    assert_rel(dx, tx.grad.numpy(), RTOL[dtype], "dx")
    assert_rel(lin.grads["weight"], tlin.weight.grad.numpy(), RTOL[dtype], "dweight")
    assert_rel(lin.grads["bias"], tlin.bias.grad.numpy(), RTOL[dtype], "dbias")
    # gradients accumulate until zero_grad
    first = {k: g.copy() for k, g in lin.grads.items()}
    lin._seq_train(x)[1](dy)
    for k in first:
        assert_rel(lin.grads[k], 2 * first[k], RTOL[dtype], k)
    lin.zero_grad()
    assert not any(g.any() for g in lin.grads.values())


def test_linear_backprop_refuses_after_parameters_changed():
    """As the recurrent layers' backprop: the weights of the forward or an error."""
    lin = fastrnn.Linear(3, 2, dtype="float64", seed=0)
    x, dy = np.ones((4, 3)), np.ones((4, 2))
    _, backprop = lin._seq_train(x)
    assert np.array_equal(backprop(dy), dy @ lin.weight)
    _, backprop = lin._seq_train(x)
    lin.load_state_dict({"weight": np.zeros((2, 3))}, strict=False)
    with pytest.raises(RuntimeError, match="Linear.backprop: the parameters changed"):
        backprop(dy)


@pytest.mark.parametrize("n_in", [1, 4, 64])
def test_linear_init_bounds(n_in):
    lin = fastrnn.Linear(n_in, 300, seed=n_in)
    bound = 1 / np.sqrt(n_in)
    for name in ("weight", "bias"):
        w = np.asarray(getattr(lin, name), np.float64)
        assert np.abs(w).max() <= bound * (1 + 1e-6)
        assert np.abs(w).max() > 0.9 * bound  # the whole range is used, not a smaller one
        assert abs(w.mean()) < 0.1 * bound
    assert lin.weight.dtype == np.float32
    same = fastrnn.Linear(n_in, 300, seed=n_in)
    assert all(np.array_equal(a, b) for a, b in zip(lin.state_dict().values(),
                                                     same.state_dict().values()))


def test_linear_without_bias():
    lin = fastrnn.Linear(4, 2, bias=False, dtype="float64", seed=0)
    assert list(lin.state_dict()) == ["weight"] and list(lin.grads) == ["weight"]
    x = np.random.default_rng(0).standard_normal((3, 4))
    assert np.allclose(lin(x), x @ lin.weight.T, rtol=1e-14, atol=0)
    lin._seq_train(x)[1](np.ones((3, 2)))
    assert_rel(lin.grads["weight"], np.ones((3, 2)).T @ x, 1e-14)
    assert "bias=False" in repr(lin)


def test_linear_bad_input():
    lin = fastrnn.Linear(4, 2)
    for x in (np.zeros((3, 5)), np.zeros(3), np.zeros(()), np.zeros((2, 4, 1))):
        with pytest.raises(ValueError, match=r"Linear: expected input of shape \(\.\.\., 4\)"):
            lin(x)
        with pytest.raises(ValueError, match="Linear: expected input of shape"):
            lin._seq_train(x)
    with pytest.raises(TypeError, match="Linear"):
        lin(np.array(["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        fastrnn.Linear(0, 2)


# =====================================================================================
# 3. Optimizers
# =====================================================================================
def _opt_setup(seed=0):
    """A float64 bidirectional LSTM and a Linear, with torch copies of their parameters."""
    lstm = fastrnn.LSTM(3, 4, bidirectional=True, dtype="float64", seed=seed)
    lin = fastrnn.Linear(8, 2, dtype="float64", seed=seed + 1)
    pairs = [(m, name, torch.tensor(value, requires_grad=True))
             for m in (lstm, lin) for name, value in m.state_dict().items()]
    return [lstm, lin], pairs


GRAD_SCALES = [3.0, 0.1, 2.0, 0.01, 1.0, 0.5]  # decreasing steps exercise amsgrad's max


def _run_both(fast_cls, torch_cls, kwargs, steps=5, seed=0):
    modules, pairs = _opt_setup(seed)
    opt = fast_cls(modules, **kwargs)
    topt = torch_cls([p for _, _, p in pairs], **kwargs)
    rng = np.random.default_rng(seed + 100)
    for step in range(steps):
        for m, name, tp in pairs:
            g = GRAD_SCALES[step] * rng.standard_normal(tp.shape)
            m.grads[name][...] = g
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
        for m, name, tp in pairs:
            assert_rel(getattr(m, name), tp.detach().numpy(), 1e-10,
                       f"step {step + 1} {type(m).__name__}.{name}")
    return opt


OPT_CASES = [
    ("SGD", {}),
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.1, "weight_decay": 0.05}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.1, "nesterov": True}),
    ("Adam", {}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("Adam", {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05,
              "amsgrad": True}),
    ("AdamW", {}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("RMSprop", {}),
    ("RMSprop", {"lr": 0.01, "centered": True}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9}),
    ("RMSprop", {"lr": 0.01, "weight_decay": 0.1}),
    ("RMSprop", {"lr": 0.005, "alpha": 0.9, "eps": 1e-5, "weight_decay": 0.05, "momentum": 0.5,
                 "centered": True}),
]


@needs_torch
@pytest.mark.parametrize("name,kwargs", OPT_CASES,
                         ids=[f"{n}-{'-'.join(map(str, k.items())) or 'defaults'}"
                              for n, k in OPT_CASES])
def test_optimizer_matches_torch(name, kwargs):
    opt = _run_both(getattr(optim, name), getattr(torch.optim, name), kwargs)
    assert opt.step_count == 5


@needs_torch
def test_adam_parameters_added_later_match_torch_param_group():
    (lstm, lin), pairs = _opt_setup(5)
    first = [p for m, _, p in pairs if m is lstm]
    later = [p for m, _, p in pairs if m is lin]
    opt = optim.Adam([lstm], lr=0.01)
    topt = torch.optim.Adam(first, lr=0.01)
    rng = np.random.default_rng(1)
    for step in range(4):
        if step == 2:
            opt.add(lin)
            topt.add_param_group({"params": later})
        for m, name, tp in pairs:
            if m is lin and step < 2:
                continue
            g = rng.standard_normal(tp.shape)
            m.grads[name][...] = g
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
        for m, name, tp in pairs:
            assert_rel(getattr(m, name), tp.detach().numpy(), 1e-10, f"{name} step {step + 1}")


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.RMSprop])
def test_optimizer_step_changes_what_forward_uses(cls):
    """After step() the layer runs with the new weights (no stale caches)."""
    rng = np.random.default_rng(0)
    lstm = fastrnn.LSTM(3, 4, num_layers=2, dtype="float64", seed=0)
    lin = fastrnn.Linear(4, 2, dtype="float64", seed=1)
    x = rng.standard_normal((5, 2, 3))
    y0 = lin(lstm(x)[0])
    opt = cls([lstm, lin], lr=0.1)
    for m in (lstm, lin):
        for g in m.grads.values():
            g[...] = rng.standard_normal(g.shape)
    opt.step()
    y1 = lin(lstm(x)[0])
    fresh_lstm = fastrnn.LSTM(3, 4, num_layers=2, dtype="float64", seed=9)
    fresh_lstm.load_state_dict(lstm.state_dict())
    fresh_lin = fastrnn.Linear(4, 2, dtype="float64", seed=9)
    fresh_lin.load_state_dict(lin.state_dict())
    assert np.abs(y1 - y0).max() > 1e-3
    assert np.array_equal(y1, fresh_lin(fresh_lstm(x)[0]))
    # step() reads the gradients without changing them
    assert all(g.any() for g in lstm.grads.values())
    opt.zero_grad()
    assert not any(g.any() for m in (lstm, lin) for g in m.grads.values())


def test_optimizer_constructor_errors():
    lin = fastrnn.Linear(2, 2)
    with pytest.raises(ValueError, match="SGD: lr must lie in"):
        optim.SGD([lin], lr=-0.1)
    with pytest.raises(ValueError, match="Adam: lr must lie in"):
        optim.Adam([lin], lr=-1e-3)
    with pytest.raises(TypeError, match="RMSprop: lr must be a number"):
        optim.RMSprop([lin], lr="0.01")
    with pytest.raises(ValueError, match="SGD: lr must be a number, got NaN"):
        optim.SGD([lin], lr=float("nan"))
    with pytest.raises(ValueError, match="SGD: nesterov needs momentum > 0 and dampening = 0"):
        optim.SGD([lin], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="SGD: nesterov needs"):
        optim.SGD([lin], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="SGD: momentum must lie in"):
        optim.SGD([lin], momentum=-0.5)
    for betas in ((0.9, 1.0), (1.5, 0.9), (-0.1, 0.999)):
        with pytest.raises(ValueError, match="Adam: betas must lie in"):
            optim.Adam([lin], betas=betas)
        with pytest.raises(ValueError, match="AdamW: betas must lie in"):
            optim.AdamW([lin], betas=betas)
    for betas in (0.9, (0.9,), (0.9, 0.99, 0.999)):
        with pytest.raises(TypeError, match="Adam: betas must be a pair"):
            optim.Adam([lin], betas=betas)
    with pytest.raises(ValueError, match="Adam: eps must lie in"):
        optim.Adam([lin], eps=-1e-8)
    with pytest.raises(ValueError, match="RMSprop: alpha must lie in"):
        optim.RMSprop([lin], alpha=-0.5)
    with pytest.raises(TypeError, match="SGD: params must be fastrnn modules"):
        optim.SGD([np.zeros(3)])
    with pytest.raises(ValueError, match="optimizer must be a fastrnn optimizer"):
        fastrnn.Sequential([lin]).compile(optimizer="lbfgs")


# =====================================================================================
# 4. Gradient clipping and learning-rate schedules
# =====================================================================================
def _clip_setup(scale):
    modules, pairs = _opt_setup(3)
    rng = np.random.default_rng(4)
    for m, name, tp in pairs:
        g = scale * rng.standard_normal(tp.shape)
        m.grads[name][...] = g
        tp.grad = torch.tensor(g)
    return modules, pairs


@needs_torch
@pytest.mark.parametrize("max_norm,scale", [(0.5, 1.0), (100.0, 1.0), (1.0, 1e-3)])
def test_clip_grad_norm_matches_torch(max_norm, scale):
    modules, pairs = _clip_setup(scale)
    total = optim.clip_grad_norm(modules, max_norm)
    ref = torch.nn.utils.clip_grad_norm_([p for _, _, p in pairs], max_norm)
    assert isinstance(total, float)
    assert total == pytest.approx(ref.item(), rel=1e-12)
    for m, name, tp in pairs:
        assert_rel(m.grads[name], tp.grad.numpy(), 1e-12, name)
    after = np.sqrt(sum((g ** 2).sum() for m in modules for g in m.grads.values()))
    assert after <= max_norm * (1 + 1e-9)


def test_clip_grad_norm_nonfinite():
    lin = fastrnn.Linear(2, 2)
    lin.grads["weight"][0, 0] = np.inf
    with pytest.raises(ValueError, match="clip_grad_norm: the total gradient norm is inf"):
        optim.clip_grad_norm(lin, 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="clip_grad_norm: max_norm must lie in"):
        optim.clip_grad_norm(lin, -1.0)
    # a NaN norm: every gradient NaN, as torch.nn.utils.clip_grad_norm_ leaves them
    lin.grads["weight"][0, 0] = np.nan
    assert np.isnan(optim.clip_grad_norm(lin, 1.0))
    assert all(np.isnan(g).all() for g in lin.grads.values())


def test_clip_grad_norm_of_huge_finite_gradients():
    """[failed before] float32 gradients near 1e20 overflowed the sum of
    squares: the norm came out inf, max_norm=inf ("never clips") made every
    gradient NaN (inf / inf), a finite max_norm zeroed them all. Now the norm
    is the float64 one, inf measures only, and a finite max_norm scales to
    it; a NaN norm under inf leaves the gradients as they were."""
    def layer(scale):
        lin = fastrnn.Linear(3, 4, seed=0)
        for name, g in lin.grads.items():
            g[...] = scale * np.random.default_rng(len(name)).standard_normal(g.shape)
        return lin
    lin = layer(1e20)
    given = {k: g.copy() for k, g in lin.grads.items()}
    want = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in given.values()))
    assert optim.clip_grad_norm(lin, math.inf) == pytest.approx(want, rel=1e-6)
    for k, g in lin.grads.items():
        np.testing.assert_array_equal(g, given[k])
    assert optim.clip_grad_norm(lin, 1.0) == pytest.approx(want, rel=1e-6)
    after = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in lin.grads.values()))
    assert after == pytest.approx(1.0, rel=1e-5)
    for k, g in lin.grads.items():
        np.testing.assert_allclose(g, given[k] / want, rtol=1e-5)
    lin = layer(1.0)
    lin.grads["weight"][0, 0] = np.nan
    given = {k: g.copy() for k, g in lin.grads.items()}
    assert math.isnan(optim.clip_grad_norm(lin, math.inf))
    for k, g in lin.grads.items():
        np.testing.assert_array_equal(g, given[k])


def test_clip_grad_norm_counts_a_shared_layer_once():
    """Sequential([lin, Tanh(), lin]): lin's gradients are one set (torch's
    clip_grad_norm_ over the model's parameters counts each once); counted
    per use, the norm came out sqrt(2) too large and the scale was applied
    twice (4.3e-7 left of a norm clipped to 1e-3)."""
    rng = np.random.default_rng(0)
    lin = fastrnn.Linear(3, 3, dtype="float64", seed=0)
    model = fastrnn.Sequential([lin, fastrnn.Tanh(), lin])
    model.compile(loss="mse", optimizer=optim.SGD(lr=0.0))
    model.train_step(rng.standard_normal((4, 3)), rng.standard_normal((4, 3)))
    true = np.sqrt(sum(float((g ** 2).sum()) for g in lin.grads.values()))
    assert true > 1e-2
    assert optim.clip_grad_norm(model, 1e-3) == pytest.approx(true, rel=1e-12)
    clipped = np.sqrt(sum(float((g ** 2).sum()) for g in lin.grads.values()))
    assert clipped == pytest.approx(1e-3, rel=1e-5)
    assert optim.clip_grad_norm([model, lin], 1e9) == pytest.approx(clipped, rel=1e-12)


@pytest.mark.parametrize("wrapper", ["Reversed", "Stateful"])
def test_a_layer_inside_a_wrapper_and_bare_is_stepped_once(wrapper):
    """A wrapper's parameters are its layer's: an optimizer given both (or a
    Sequential holding both, weights shared by a forward and a reversed
    pass) held the layer twice and moved it by twice the SGD step."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5, 3))
    gru = fastrnn.GRU(3, 3, batch_first=True, dtype="float64", seed=0)
    model = fastrnn.Sequential([getattr(fastrnn, wrapper)(gru), fastrnn.LastStep()])
    opt = optim.SGD([model, gru], lr=1.0)
    assert len(opt._modules) == 1
    before = gru.state_dict()
    (out, _), backprop = gru.forward_train(x)
    backprop(np.ones_like(out))
    grads = {k: g.copy() for k, g in gru.grads.items()}
    opt.step()
    for name, value in gru.state_dict().items():
        np.testing.assert_allclose(value, before[name] - grads[name], rtol=0, atol=1e-14)

    shared = fastrnn.GRU(3, 3, batch_first=True, dtype="float64", seed=0)
    model = fastrnn.Sequential([fastrnn.Reversed(shared), shared])
    model.compile(loss="mse", optimizer=optim.SGD(lr=1.0))
    before = shared.state_dict()
    y = rng.standard_normal((4, 5, 3))
    model.zero_grad()
    model.train_step(x, y)
    for name, value in shared.state_dict().items():
        np.testing.assert_allclose(value, before[name] - shared.grads[name], rtol=0,
                                   atol=1e-14)


@pytest.mark.parametrize("make_opt", [lambda: optim.SGD(lr=0.1),
                                      lambda: optim.Adam(lr=0.01, weight_decay=0.1)])
def test_a_model_compiled_with_a_wider_optimizer_steps_only_its_own_layers(make_opt):
    """A head (model[2:]) compiled with the whole model's optimizer, which
    compile accepts (it covers the head's Linear), trains the head alone:
    the GRU before it keeps its weights and its moments, whatever
    gradients it still holds (PyTorch skips parameters that took no
    gradient). Its step moved the GRU by its stale gradient every time."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 5, 3))
    y = rng.standard_normal((16, 1))
    full = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, dtype="float64", seed=0),
                               fastrnn.LastStep(), fastrnn.Linear(4, 1, dtype="float64", seed=1)])
    full.compile(loss="mse", optimizer=make_opt())
    full.train_step(x, y)
    gru_weights, gru_moments = full[0].state_dict(), full.optimizer.state_dict()["state"][:4]
    assert any(np.abs(g).max() > 0 for g in full[0].grads.values())   # stale, still held
    head = full[2:]
    head.compile(loss="mse", optimizer=full.optimizer)
    features = full[0:2].predict(x)
    linear_before = head[0].state_dict()
    for _ in range(3):
        head.train_step(features, y)
    assert _same_state_dicts(full[0].state_dict(), gru_weights)
    for kept, now in zip(gru_moments, full.optimizer.state_dict()["state"][:4]):
        assert kept.keys() == now.keys()
        assert all(np.array_equal(kept[k], now[k]) for k in kept)
    assert not _same_state_dicts(head[0].state_dict(), linear_before)   # the head trained
    full.train_step(x, y)   # the whole model still steps every layer
    assert not _same_state_dicts(full[0].state_dict(), gru_weights)


def test_an_optimizer_subclass_with_its_own_step_is_called_by_the_train_step():
    class Counting(optim.SGD):
        calls = 0

        def step(self):
            Counting.calls += 1
            super().step()

    model = fastrnn.Sequential([fastrnn.Linear(2, 1, seed=0)])
    model.compile(loss="mse", optimizer=Counting(lr=0.1))
    rng = np.random.default_rng(0)
    before = model.state_dict()
    model.train_step(rng.standard_normal((4, 2)), rng.standard_normal((4, 1)))
    assert Counting.calls == 1
    assert not _same_state_dicts(model.state_dict(), before)


def test_two_models_stepping_one_optimizer_in_two_threads_keep_every_moment():
    """Each model's step updates its own layers under every module's lock:
    the optimizer's state is replaced whole, so under its own layers' locks
    alone each step wrote back its stale copy of the other model's moments
    (Adam's per-array step counts came out 178 and 28 of 200)."""
    models = [fastrnn.Sequential([fastrnn.Linear(300, 300, seed=k)]) for k in range(2)]
    opt = optim.Adam(models, lr=1e-3)
    for model in models:
        model.compile(loss="mse", optimizer=opt)
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((8, 300)).astype(np.float32) for _ in range(2))
    steps = 100

    def run(model):
        for _ in range(steps):
            model.train_step(x, y)

    run_interleaved([lambda m=m: run(m) for m in models])
    assert opt.step_count == 2 * steps
    assert [state["step"] for state in opt._state] == [steps] * 4


def _same_state_dicts(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@needs_torch
@pytest.mark.parametrize("clip", [0.3, 10.0])
def test_clip_grad_value_matches_torch(clip):
    modules, pairs = _clip_setup(1.0)
    assert optim.clip_grad_value(modules, clip) is None
    torch.nn.utils.clip_grad_value_([p for _, _, p in pairs], clip)
    for m, name, tp in pairs:
        assert np.array_equal(m.grads[name], tp.grad.numpy()), name
    assert max(np.abs(g).max() for m in modules for g in m.grads.values()) <= clip


SCHEDULES = [("StepLR", {"step_size": 3, "gamma": 0.5}),
             ("StepLR", {"step_size": 1}),
             ("ExponentialLR", {"gamma": 0.9}),
             ("CosineAnnealingLR", {"T_max": 4, "eta_min": 0.001}),
             ("CosineAnnealingLR", {"T_max": 10})]


@needs_torch
@pytest.mark.parametrize("name,kwargs", SCHEDULES)
def test_schedules_match_torch(name, kwargs):
    opt = optim.SGD([fastrnn.Linear(2, 1)], lr=0.1)
    topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = getattr(optim, name)(opt, **kwargs)
    tsched = getattr(torch.optim.lr_scheduler, name)(topt, **kwargs)
    assert opt.lr == topt.param_groups[0]["lr"] == 0.1
    for epoch in range(1, 11):
        topt.step()
        tsched.step()
        lr = sched.step()
        assert lr == opt.lr == topt.param_groups[0]["lr"], epoch


@needs_torch
def test_schedules_chain_as_torchs_do():
    """Two schedules compound, and a rate changed between steps (what
    ReduceLROnPlateau does) goes on from there: PyTorch's bits each epoch."""
    for pair in ((SCHEDULES[0], SCHEDULES[2]), (SCHEDULES[2], SCHEDULES[3]),
                 (SCHEDULES[4], SCHEDULES[1])):
        opt = optim.SGD([fastrnn.Linear(2, 1)], lr=0.1)
        topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        scheds = [getattr(optim, name)(opt, **kwargs) for name, kwargs in pair]
        tscheds = [getattr(torch.optim.lr_scheduler, name)(topt, **kwargs)
                   for name, kwargs in pair]
        for epoch in range(1, 25):
            topt.step()
            for sched, tsched in zip(scheds, tscheds):
                sched.step()
                tsched.step()
            if epoch in (5, 11):
                opt.lr *= 0.3
                topt.param_groups[0]["lr"] *= 0.3
            assert opt.lr == topt.param_groups[0]["lr"], (pair, epoch)


def test_a_plateau_reduction_outlasts_a_schedule():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 2)), rng.standard_normal((8, 1))
    model = fastrnn.Sequential([fastrnn.Linear(2, 1, seed=0)], seed=0)
    model.compile("mse", optim.SGD(lr=0.1))
    sched = optim.StepLR(model.optimizer, step_size=100)
    # monitor a value that never improves: every epoch past the first reduces
    plateau = fastrnn.ReduceLROnPlateau(monitor="loss", mode="max", factor=0.5, patience=0)
    history = model.fit(x, y, epochs=4, callbacks=[plateau, sched], verbose=0)
    # (the StepLR of 100 epochs had set the rate back to 0.1 at every step)
    assert history.history["learning_rate"] == [0.1, 0.1, 0.05, 0.025]
    assert model.optimizer.lr == 0.0125


def test_schedule_as_fit_callback_and_errors():
    rng = np.random.default_rng(0)
    model = fastrnn.Sequential([fastrnn.Linear(2, 1, seed=0)], seed=0)
    opt = optim.SGD(lr=0.1)
    model.compile("mse", opt)
    sched = optim.ExponentialLR(opt, gamma=0.5)
    model.fit(rng.standard_normal((8, 2)), rng.standard_normal((8, 1)), epochs=3,
              callbacks=[sched], verbose=0)
    assert opt.lr == pytest.approx(0.1 * 0.5 ** 3, rel=1e-15)
    with pytest.raises(ValueError, match="StepLR: step_size must be a positive int"):
        optim.StepLR(opt, step_size=0)
    with pytest.raises(ValueError, match="CosineAnnealingLR: T_max must be a positive int"):
        optim.CosineAnnealingLR(opt, T_max=0)
    with pytest.raises(TypeError, match="ExponentialLR: expected a fastrnn optimizer"):
        optim.ExponentialLR("adam", gamma=0.5)


# =====================================================================================
# 5. Sequential
# =====================================================================================
def adding_problem(n, T, rng):
    """Inputs (value, marker) pairs; target the sum of the two marked values."""
    values = rng.random((n, T))
    markers = np.zeros((n, T))
    picks = np.argsort(rng.random((n, T)), axis=1)[:, :2]
    np.put_along_axis(markers, picks, 1.0, axis=1)
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values * markers).sum(axis=1, keepdims=True).astype(np.float32)
    return x, y


def test_fit_learns_the_adding_problem():
    rng = np.random.default_rng(0)
    x, y = adding_problem(2500, 30, rng)
    x_train, y_train, x_val, y_val = x[:2000], y[:2000], x[2000:], y[2000:]
    # the best constant predictor (the mean, 1.0): MSE = var(U + U') = 2/12 = 1/6
    trivial = float(np.mean((y_val - y_train.mean()) ** 2))
    assert trivial == pytest.approx(1 / 6, rel=0.15)
    model = fastrnn.Sequential([fastrnn.GRU(2, 24, batch_first=True, seed=0),
                                fastrnn.LastStep(), fastrnn.Linear(24, 1, seed=1)], seed=2)
    model.compile(loss="mse", optimizer=optim.Adam(lr=1e-2))
    history = model.fit(x_train, y_train, epochs=10, batch_size=32,
                        validation_data=(x_val, y_val), verbose=0)
    val = history.history["val_loss"]
    # a model that ignores the markers cannot beat 1/6; a wrong backward cannot reach this
    assert val[-1] < 0.01 < trivial / 15
    assert model.evaluate(x_val, y_val) == pytest.approx(val[-1], rel=1e-5)
    pred = model.predict(x_val, batch_size=100)
    assert pred.shape == (500, 1) and pred.dtype == np.float32
    assert float(np.mean((pred - y_val) ** 2)) < 0.01


def _grad_model_a():
    return fastrnn.Sequential([
        fastrnn.LSTM(2, 3, batch_first=True, dtype="float64", seed=0),
        fastrnn.Dropout(0.0),
        fastrnn.LSTM(3, 3, dtype="float64", seed=1),  # time-major inside: Sequential adapts
        fastrnn.LastStep(),
        fastrnn.Linear(3, 2, dtype="float64", seed=2)])


def _grad_model_b():
    return fastrnn.Sequential([
        fastrnn.GRU(2, 2, batch_first=True, bidirectional=True, dtype="float64", seed=3),
        fastrnn.Linear(4, 3, dtype="float64", seed=4),
        fastrnn.Tanh(),
        fastrnn.RNN(3, 2, nonlinearity="relu", bidirectional=True, dtype="float64", seed=5),
        fastrnn.LastStep(bidirectional=True),
        fastrnn.Sigmoid(),
        fastrnn.Linear(4, 3, dtype="float64", seed=6),
        fastrnn.ReLU(),
        fastrnn.Linear(3, 2, dtype="float64", seed=7)])


def _grad_case(which):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5, 2))
    if which == "a":
        return _grad_model_a(), fastrnn.MSELoss(), x, rng.standard_normal((3, 2))
    return _grad_model_b(), fastrnn.CrossEntropyLoss(), x, np.array([0, 1, 1])


def _manual_grads(model, loss, x, y):
    out, backprops = x, []
    for layer in model.layers:
        out, bp = layer._seq_train(out)
        backprops.append(bp)
    value, grad = loss.value_and_grad(out, y)
    model.zero_grad()
    for bp in reversed(backprops):
        grad = bp(grad)
    grads = {f"{i}.{k}": g.copy() for i, layer in enumerate(model.layers)
             for k, g in getattr(layer, "grads", {}).items()}
    return value, grads, grad


@pytest.mark.parametrize("which", ["a", "b"])
def test_sequential_gradient_matches_finite_differences(which):
    model, loss, x, y = _grad_case(which)
    value, grads, _ = _manual_grads(model, loss, x, y)
    assert value == pytest.approx(loss(model(x), y), rel=1e-14)
    assert set(grads) == set(model.state_dict())
    state = model.state_dict()
    for key, param in state.items():
        def f():
            model.load_state_dict(state)
            return loss(model(x), y)
        numeric = numeric_grad(f, param)
        assert_fd(grads[key], numeric, key)
    # what train_step applies is that gradient: SGD(lr=1) moves by exactly -grad
    model.load_state_dict(state)
    model.compile(loss, optim.SGD(lr=1.0))
    assert model.train_step(x, y) == pytest.approx(value, rel=1e-14)
    after = model.state_dict()
    for key in state:
        assert_rel(state[key] - after[key], grads[key], 1e-12, key)


@needs_torch
def test_sequential_gradient_matches_torch():
    model, loss, x, y = _grad_case("a")
    value, grads, dx = _manual_grads(model, loss, x, y)
    l1 = torch.nn.LSTM(2, 3, batch_first=True, dtype=torch.float64)
    l2 = torch.nn.LSTM(3, 3, dtype=torch.float64)
    head = torch.nn.Linear(3, 2, dtype=torch.float64)
    for tmod, i in ((l1, 0), (l2, 2), (head, 4)):
        tmod.load_state_dict({k: torch.from_numpy(v)
                              for k, v in model.layers[i].state_dict().items()})
    tx = tt(x, grad=True)
    h = l1(tx)[0]
    h = l2(h.transpose(0, 1))[0][-1]
    tvalue = F.mse_loss(head(h), tt(y))
    tvalue.backward()
    assert value == pytest.approx(tvalue.item(), rel=1e-12)
    named = {f"{i}.{k}": p for tmod, i in ((l1, 0), (l2, 2), (head, 4))
             for k, p in tmod.named_parameters()}
    for key, p in named.items():
        assert_rel(grads[key], p.grad.numpy(), 1e-10, key)
    assert_rel(dx, tx.grad.numpy(), 1e-10, "dx")


def _small_data(seed=0, n=48):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6, 3)).astype(np.float32)
    y = x[:, -2:, :2].sum(axis=1) + 0.1 * rng.standard_normal((n, 2)).astype(np.float32)
    return x, y


def _small_model(layer_seed=0, model_seed=0):
    return fastrnn.Sequential([
        fastrnn.LSTM(3, 5, batch_first=True, seed=layer_seed),
        fastrnn.Dropout(0.3, seed=layer_seed + 1),
        fastrnn.GRU(5, 4, batch_first=True, seed=layer_seed + 2),
        fastrnn.LastStep(),
        fastrnn.Linear(4, 2, seed=layer_seed + 3)], seed=model_seed)


def _fit(model, x, y, **kw):
    model.compile("mse", optim.Adam(lr=1e-2))
    kw.setdefault("epochs", 3)
    kw.setdefault("batch_size", 8)
    return model.fit(x, y, verbose=0, **kw)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(
        sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]) for k in sa)


def test_fit_is_reproducible_from_seeds():
    x, y = _small_data()
    runs = []
    for model_seed in (0, 0, 1):
        model = _small_model(model_seed=model_seed)
        runs.append((model, _fit(model, x, y, validation_split=0.25)))
    (a, ha), (b, hb), (c, hc) = runs
    assert _same_state(a, b)
    assert ha.history == hb.history
    assert not _same_state(a, c)  # another shuffle order
    assert ha.history["loss"] != hc.history["loss"]
    # without shuffling, the model's seed does not matter
    d, e = _small_model(model_seed=3), _small_model(model_seed=4)
    _fit(d, x, y, shuffle=False)
    _fit(e, x, y, shuffle=False)
    assert _same_state(d, e)
    assert not _same_state(d, a)


def test_validation_split_takes_the_last_samples():
    x, y = _small_data(1, n=40)
    a, b, c = _small_model(), _small_model(), _small_model()
    ha = _fit(a, x, y, validation_split=0.25)
    hb = _fit(b, x[:30], y[:30], validation_data=(x[30:], y[30:]))
    hc = _fit(c, x[10:], y[10:], validation_data=(x[:10], y[:10]))
    assert ha.history == hb.history
    assert _same_state(a, b)
    assert ha.history["val_loss"] != hc.history["val_loss"]
    assert ha.history["val_loss"][-1] == pytest.approx(a.evaluate(x[30:], y[30:]), rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_val_loss_is_on_the_scale_of_loss_for_a_sum_loss(reduction):
    """A 'sum' loss's epoch value (the batches' sums averaged) depends on the
    batch size: validation runs in batches of batch_size, as Keras', so that
    on the training data with nothing learned val_loss equals loss. [failed
    before: validation ran in batches of 256, val_loss 5x loss]"""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 5, 2)), rng.standard_normal((40, 1))
    model = fastrnn.Sequential([fastrnn.GRU(2, 4, batch_first=True, dtype="float64", seed=0),
                                fastrnn.LastStep(), fastrnn.Linear(4, 1, dtype="float64", seed=1)])
    model.compile(loss=fastrnn.MSELoss(reduction=reduction), optimizer=optim.SGD(lr=0.0))
    history = model.fit(x, y, batch_size=8, shuffle=False, validation_data=(x, y), verbose=0)
    assert history.history["val_loss"][0] == pytest.approx(history.history["loss"][0], rel=1e-12)
    assert history.history["val_loss"][0] == pytest.approx(
        model.evaluate(x, y, batch_size=8), rel=1e-12)


def test_validation_split_error_names_the_argument():
    x, y = _small_data()
    model = _small_model()
    model.compile()
    with pytest.raises(ValueError, match="validation_split"):
        model.fit(x, y, validation_split=1.5, verbose=0)


def test_validation_split_leaving_no_samples():
    """Keras' rounding: floor(n * (1 - split)) training samples."""
    x, y = _small_data(n=3)
    model = _small_model()
    model.compile()
    with pytest.raises(ValueError, match="validation_split=0.7 leaves 0 training and 3 validation"):
        model.fit(x, y, validation_split=0.7, verbose=0)
    history = model.fit(x, y, validation_split=0.1, verbose=0)   # 2 training, 1 validation
    assert "val_loss" in history.history


def test_validation_targets_the_loss_would_refuse_are_refused_before_training():
    """[failed before] validation_data's y of another shape (1-D for an
    (N, 1) output) or float labels for cross-entropy were refused by the
    loss after a whole epoch of training, the weights changed, in a message
    naming the loss's target and a batch's shape. Now before the first
    step, naming the validation targets; per-step targets of validation
    sequences of another length stay accepted."""
    rng = np.random.default_rng(0)
    x = rng.random((32, 5, 3)).astype(np.float32)

    def model(out, loss, per_step=False):
        layers = [fastrnn.GRU(3, 8, batch_first=True, seed=0)]
        layers += [] if per_step else [fastrnn.LastStep()]
        m = fastrnn.Sequential(layers + [fastrnn.Linear(8, out, seed=1)], seed=2)
        m.compile(loss, "adam")
        return m

    m = model(1, "mse")
    y = rng.random((32, 1)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^Sequential.fit: validation y has shape \(8,\), y "
                                         r"\(32, 1\): expected the same shape past the samples "
                                         r"axis$"):
        m.fit(x, y, epochs=2, batch_size=8, validation_data=(x[:8], y[:8, 0]), verbose=0)
    c = model(3, "cross_entropy")
    labels = rng.integers(0, 3, 32)
    with pytest.raises(TypeError, match=r"^Sequential.fit: validation y must hold integer class "
                                        r"indices, got dtype float64$"):
        c.fit(x, labels, validation_data=(x[:8], labels[:8].astype(float)), verbose=0)
    for trained, fresh in ((m, model(1, "mse")), (c, model(3, "cross_entropy"))):
        for name, value in trained.state_dict().items():     # no step was taken
            np.testing.assert_array_equal(value, fresh.state_dict()[name])
    # per-step targets, validation sequences longer than the training ones
    m = model(2, "mse", per_step=True)
    x_val = rng.random((6, 9, 3)).astype(np.float32)
    history = m.fit(x, rng.random((32, 5, 2)), validation_data=(x_val, rng.random((6, 9, 2))),
                    epochs=1, verbose=0)
    assert "val_loss" in history.history
    with pytest.raises(ValueError, match=r"validation y has shape \(6, 9, 1\), y \(32, 5, 2\): "
                                         r"expected the same shape past the samples and steps "
                                         r"axes"):
        m.fit(x, rng.random((32, 5, 2)), validation_data=(x_val, rng.random((6, 9, 1))),
              verbose=0)


class Recorder(fastrnn.Callback):
    def on_train_begin(self, model):
        self.states, self.logs = [], []

    def on_epoch_end(self, model, epoch, logs):
        self.states.append(model.state_dict())
        self.logs.append(dict(logs))


def _overfit_setup():
    """Training moves a Linear from ~0 to w; validation wants w / 2, so val_loss
    falls, then rises."""
    rng = np.random.default_rng(0)
    w = np.array([[2.0, -1.5, 1.0, 2.5]])
    x = rng.standard_normal((64, 4))
    xv = rng.standard_normal((32, 4))
    model = fastrnn.Sequential([fastrnn.Linear(4, 1, bias=False, dtype="float64", seed=0)],
                               seed=0)
    model.compile("mse", optim.SGD(lr=0.01))
    return model, x, x @ w.T, xv, 0.5 * xv @ w.T


def test_early_stopping_restores_the_best_weights():
    model, x, y, xv, yv = _overfit_setup()
    rec = Recorder()
    stop = fastrnn.EarlyStopping(patience=2, restore_best_weights=True)
    history = model.fit(x, y, epochs=100, batch_size=16, validation_data=(xv, yv),
                        callbacks=[rec, stop], verbose=0)
    val = [log["val_loss"] for log in rec.logs]
    ran = len(history.epoch)
    best = int(np.argmin(val))
    assert val == history.history["val_loss"]
    assert 2 <= best and ran < 30  # improved for a while, then stopped early
    assert stop.best_epoch == best
    assert all(v >= val[best] for v in val[best + 1:])
    assert best + 3 <= ran <= best + 4  # Keras stops after patience bad epochs (see below)
    assert stop.stopped_epoch == ran - 1
    best_state = rec.states[best]
    assert list(model.state_dict()) == list(best_state)
    assert all(np.array_equal(model.state_dict()[k], best_state[k]) for k in best_state)
    assert not np.array_equal(rec.states[-1]["0.weight"], best_state["0.weight"])
    assert model.evaluate(xv, yv) == pytest.approx(val[best], rel=1e-12)


class _FakeModel:
    def __init__(self):
        self.stop_training = False
        self.weights = 0

    def state_dict(self):
        return {"w": self.weights}

    def load_state_dict(self, state):
        self.weights = state["w"]


def _drive(stop, values):
    model = _FakeModel()
    stop.on_train_begin(model)
    for epoch, value in enumerate(values):
        model.weights = epoch
        stop.on_epoch_end(model, epoch, {"val_loss": value})
        if model.stop_training:
            break
    stop.on_train_end(model)
    return epoch, model.weights


def test_early_stopping_without_early_stop_still_restores():
    stop = fastrnn.EarlyStopping(patience=5, restore_best_weights=True)
    last, weights = _drive(stop, [3.0, 2.0, 1.0, 1.5, 1.2])
    assert last == 4 and weights == 2 and stop.stopped_epoch is None
    last, weights = _drive(fastrnn.EarlyStopping(patience=5), [3.0, 2.0, 1.0, 1.5, 1.2])
    assert weights == 4  # without restore_best_weights, the last weights stay
    # min_delta: improvements smaller than it do not count
    stop = fastrnn.EarlyStopping(patience=0, min_delta=0.5)
    last, _ = _drive(stop, [3.0, 2.8, 2.0, 1.0])
    assert last == 1 and stop.best_epoch == 0
    with pytest.raises(ValueError, match="EarlyStopping: monitor 'val_loss' is not among"):
        stop.on_epoch_end(_FakeModel(), 0, {"loss": 1.0})
    with pytest.raises(ValueError, match="EarlyStopping: mode must be"):
        fastrnn.EarlyStopping(mode="best")


def test_early_stopping_patience_zero_stops_on_the_first_bad_epoch():
    stop = fastrnn.EarlyStopping(patience=0)
    last, _ = _drive(stop, [3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    assert last == 2 and stop.stopped_epoch == 2 and stop.best_epoch == 1
    stop = fastrnn.EarlyStopping(monitor="acc", mode="max", patience=0)
    model = _FakeModel()
    stop.on_train_begin(model)
    for epoch, acc in enumerate([0.5, 0.7, 0.6]):
        stop.on_epoch_end(model, epoch, {"acc": acc})
    assert model.stop_training and stop.best_epoch == 1


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_early_stopping_stops_after_patience_bad_epochs(patience):
    stop = fastrnn.EarlyStopping(patience=patience)
    values = [5.0, 4.0, 3.0] + [3.5 + i for i in range(10)]
    last, _ = _drive(stop, values)
    assert last == 2 + patience and stop.stopped_epoch == 2 + patience


def test_early_stopping_keras_example():
    # Keras' docstring example: patience=3, a loss that never improves -> 4 epochs run
    model = fastrnn.Sequential([fastrnn.Linear(20, 10, seed=0)], seed=0)
    model.compile("mse", optim.SGD(lr=0.0))
    history = model.fit(np.ones((5, 20)), np.zeros((5, 10)), epochs=10, batch_size=1,
                        callbacks=[fastrnn.EarlyStopping(monitor="loss", patience=3)],
                        verbose=0)
    assert len(history.epoch) == 4


def test_history_contents():
    x, y = _small_data(2, n=32)
    model = _small_model()
    model.compile("mse", optim.SGD(lr=0.01))
    x0_loss = model.evaluate(x, y)
    history = model.fit(x, y, epochs=4, batch_size=32, shuffle=False, verbose=0)
    assert isinstance(history, fastrnn.History)
    assert history.epoch == [0, 1, 2, 3]
    assert list(history.history) == ["loss"]
    assert all(isinstance(v, float) for v in history.history["loss"])
    assert len(history.history["loss"]) == 4
    # one full batch: the first epoch's loss is the loss before any step, dropout aside
    model2 = _small_model()
    model2.layers[1] = fastrnn.Dropout(0.0)
    model2.compile("mse", optim.SGD(lr=0.01))
    h2 = model2.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0)
    assert h2.history["loss"][0] == pytest.approx(x0_loss, rel=1e-6)
    h3 = model2.fit(x, y, epochs=2, batch_size=8, validation_data=(x[:8], y[:8]), verbose=0)
    assert list(h3.history) == ["loss", "val_loss"]
    assert h3.history["val_loss"][-1] == pytest.approx(model2.evaluate(x[:8], y[:8]), rel=1e-6)
    assert "epochs=2" in repr(h3)


@pytest.mark.parametrize("verbose", [0, 1, 2])
def test_verbose_output(verbose, capsys):
    x, y = _small_data(n=16)
    model = _small_model()
    model.compile()
    model.fit(x, y, epochs=3, batch_size=8, validation_split=0.25, verbose=verbose)
    out, err = capsys.readouterr()
    assert err == ""
    if verbose == 0:
        assert out == ""
        return
    lines = out.splitlines()
    assert len(lines) == 3  # capsys is not a terminal: one line per epoch for 1 too
    for i, line in enumerate(lines):
        assert line.startswith(f"Epoch {i + 1}/3")
        assert "loss: " in line and "val_loss: " in line
    with pytest.raises(ValueError, match="verbose must be 0, 1 or 2"):
        model.fit(x, y, verbose=3)


@pytest.mark.parametrize("shuffle", ["batch", "false", None])
def test_fit_refuses_a_shuffle_that_is_not_a_bool(shuffle):
    """Keras' shuffle='batch' (or a string meant as False) shuffled everything."""
    x, y = _small_data(n=16)
    model = _small_model()
    model.compile()
    with pytest.raises(TypeError, match="Sequential.fit: shuffle must be a bool, got"):
        model.fit(x, y, shuffle=shuffle, verbose=0)


# --- save / load ---------------------------------------------------------------------
def _rich_model(dtype):
    return fastrnn.Sequential([
        fastrnn.RNN(3, 4, num_layers=2, nonlinearity="relu", bidirectional=True,
                    batch_first=True, dtype=dtype, seed=0),
        fastrnn.Dropout(0.2, seed=1),
        fastrnn.GRU(8, 5, bias=False, dtype=dtype, seed=2),
        fastrnn.Tanh(),
        fastrnn.GRU(5, 5, reset_after=False, dtype=dtype, seed=6),
        fastrnn.LSTM(5, 3, num_layers=2, dropout=0.1, bidirectional=True, dtype=dtype, seed=3),
        fastrnn.LastStep(bidirectional=True),
        fastrnn.Linear(6, 4, dtype=dtype, seed=4),
        fastrnn.ReLU(),
        fastrnn.Linear(4, 2, bias=False, dtype=dtype, seed=5),
        fastrnn.Sigmoid()])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip(dtype, tmp_path):
    model = _rich_model(dtype)
    # trained a little, so the weights are not the constructor's
    x = np.random.default_rng(0).standard_normal((10, 7, 3))
    model.compile("mse", optim.Adam(lr=1e-2))
    model.fit(x, np.full((10, 2), 0.3), epochs=2, batch_size=4, verbose=0)
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = fastrnn.load(path)
    assert isinstance(loaded, fastrnn.Sequential) and loaded is not model
    assert [type(a) for a in loaded.layers] == [type(b) for b in model.layers]
    assert [a._config for a in loaded.layers] == [b._config for b in model.layers]
    assert repr(loaded) == repr(model)
    assert _same_state(loaded, model)
    assert np.array_equal(loaded.predict(x), model.predict(x))
    assert loaded.predict(x).dtype == np.dtype(dtype)
    assert fastrnn.Sequential.load(str(path)).state_dict().keys() == model.state_dict().keys()
    # saved with its optimizer, a model comes back compiled; without, it does not
    assert isinstance(loaded.optimizer, optim.Adam) and isinstance(loaded.loss, fastrnn.MSELoss)
    assert np.isfinite(loaded.train_step(x, np.zeros((10, 2))))
    model.save(path, include_optimizer=False)
    loaded = fastrnn.load(path)
    with pytest.raises(RuntimeError, match="compile"):
        loaded.train_step(x, np.zeros((10, 2)))
    loaded.compile()
    assert np.isfinite(loaded.train_step(x, np.zeros((10, 2))))


def test_saved_file_is_a_plain_npz(tmp_path):
    model = _rich_model("float32")
    path = tmp_path / "m.npz"
    model.save(path)
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        assert "config" in files
        config = json.loads(str(data["config"][()]))
        weights = {k[len("weights/"):]: data[k] for k in files if k != "config"}
    assert files == {"config"} | {f"weights/{k}" for k in model.state_dict()}
    assert all(w.dtype != object for w in weights.values())
    assert config["format"] == "fastrnn/2" and config["kind"] == "Sequential"
    assert [entry["class"] for entry in config["layers"]] == [type(layer).__name__
                                                              for layer in model.layers]
    assert all(np.array_equal(weights[k], v) for k, v in model.state_dict().items())


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(b"old contents")
    a = fastrnn.Sequential([fastrnn.Linear(3, 2, seed=0)])
    b = fastrnn.Sequential([fastrnn.GRU(3, 2, batch_first=True, seed=1), fastrnn.LastStep()])
    a.save(path)
    assert _same_state(fastrnn.load(path), a)
    b.save(path)
    loaded = fastrnn.load(path)
    assert isinstance(loaded.layers[0], fastrnn.GRU) and _same_state(loaded, b)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]  # no temporary files left
    # the name is used as given (no '.npz' appended)
    b.save(tmp_path / "plain")
    assert _same_state(fastrnn.load(tmp_path / "plain"), b)


def _good_config():
    return {"format": "fastrnn.Sequential/1", "fastrnn_version": fastrnn.__version__,
            "layers": [{"class": "Linear", "config": {"in_features": 3, "out_features": 2,
                                                      "bias": True, "dtype": "float32"}}]}


GOOD_WEIGHTS = {"weights/0.weight": np.zeros((3, 2)).T, "weights/0.bias": np.zeros(2)}


def _npz(path, config=None, weights=GOOD_WEIGHTS, raw_config=None):
    arrays = dict(weights)
    if raw_config is not None:
        arrays["config"] = raw_config
    elif config is not None:
        arrays["config"] = np.array(json.dumps(config))
    np.savez(path, **arrays)


def _write_npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))


def _cfg(**changes):
    cfg = _good_config()
    cfg.update(changes)
    return cfg


def _bad_layer(entry):
    return _cfg(layers=[entry])


DAMAGED = {
    "truncated": lambda p, good: p.write_bytes(good[: len(good) // 2]),
    "truncated_tail": lambda p, good: p.write_bytes(good[:-30]),
    "random_bytes": lambda p, good: p.write_bytes(
        np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()),
    "empty": lambda p, good: p.write_bytes(b""),
    "flipped_byte": lambda p, good: p.write_bytes(
        good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 0xFF]) + good[len(good) // 2 + 1:]),
    "text": lambda p, good: p.write_text("not a model\n"),
    "no_config": lambda p, good: _npz(p),
    "config_not_json": lambda p, good: _npz(p, raw_config=np.array("{not json")),
    "config_a_number": lambda p, good: _npz(p, raw_config=np.array(5.0)),
    "config_a_list": lambda p, good: _npz(p, raw_config=np.array("[1, 2]")),
    "wrong_format": lambda p, good: _npz(p, _cfg(format="keras/2")),
    "no_format": lambda p, good: _npz(p, {"layers": _good_config()["layers"]}),
    "unknown_class": lambda p, good: _npz(p, _bad_layer({"class": "Conv1d", "config": {}})),
    "dotted_class": lambda p, good: _npz(p, _bad_layer({"class": "os.system", "config": {}})),
    "sequential_class": lambda p, good: _npz(p, _bad_layer({"class": "Sequential",
                                                            "config": {}})),
    "layer_not_a_dict": lambda p, good: _npz(p, _cfg(layers=["Linear"])),
    "layer_config_missing": lambda p, good: _npz(p, _bad_layer({"class": "Linear"})),
    "layer_config_wrong": lambda p, good: _npz(p, _bad_layer(
        {"class": "Linear", "config": {"in_features": "3", "out_features": 2}})),
    "layer_config_extra_key": lambda p, good: _npz(p, _bad_layer(
        {"class": "Linear", "config": {"in_features": 3, "out_features": 2, "evil": 1}})),
    "layer_bad_dtype": lambda p, good: _npz(p, _bad_layer(
        {"class": "Linear", "config": {"in_features": 3, "out_features": 2,
                                       "dtype": "float16"}})),
}

# damaged in ways the loader does not wrap into its ValueError
LOAD_BUGS = {
    "layers_not_a_list": (lambda p, good: _npz(p, _cfg(layers=5)),
                          "config 'layers': 5 -> TypeError: 'int' object is not iterable"),
    "layers_null": (lambda p, good: _npz(p, _cfg(layers=None)),
                    "config 'layers': null -> TypeError: 'NoneType' object is not iterable"),
    "layers_empty": (lambda p, good: _npz(p, _cfg(layers=[])),
                     "config 'layers': [] -> TypeError from Sequential([])"),
    "layers_missing": (lambda p, good: _npz(p, {"format": "fastrnn.Sequential/1"}),
                       "config without 'layers' -> TypeError from Sequential([])"),
    "weights_missing": (lambda p, good: _npz(p, _good_config(), weights={}),
                        "no weights -> ValueError 'Sequential: load_state_dict: missing keys' "
                        "without 'fastrnn.load'"),
    "weights_wrong_shape": (lambda p, good: _npz(p, _good_config(), weights={
        "weights/0.weight": np.zeros((3, 3)), "weights/0.bias": np.zeros(2)}),
        "-> ValueError 'Linear: expected weight of shape' without 'fastrnn.load'"),
    "weights_nan": (lambda p, good: _npz(p, _good_config(), weights={
        "weights/0.weight": np.full((2, 3), np.nan), "weights/0.bias": np.zeros(2)}),
        "-> ValueError 'Linear: weight has non-finite values' without 'fastrnn.load'"),
    "weights_strings": (lambda p, good: _npz(p, _good_config(), weights={
        "weights/0.weight": np.full((2, 3), "x"), "weights/0.bias": np.zeros(2)}),
        "-> TypeError 'must have a real numeric dtype'"),
    "npy_not_npz": (lambda p, good: _write_npy(p),
                    "a .npy file (np.load returns an ndarray) -> TypeError: 'numpy.ndarray' "
                    "object does not support the context manager protocol"),
    "weights_unexpected": (lambda p, good: _npz(p, _good_config(), weights=dict(
        GOOD_WEIGHTS, **{"weights/5.weight": np.zeros(2)})),
        "-> ValueError 'Sequential: load_state_dict: ... unexpected keys' without "
        "'fastrnn.load'"),
}


def _load_cases():
    cases = [pytest.param(make, id=name) for name, make in DAMAGED.items()]
    cases += [pytest.param(make, id=name) for name, (make, _) in LOAD_BUGS.items()]
    return cases


@pytest.mark.parametrize("damage", _load_cases())
def test_load_damaged_file_raises_value_error(damage, tmp_path):
    model = fastrnn.Sequential([fastrnn.Linear(3, 2, seed=0)])
    good_path = tmp_path / "good.npz"
    model.save(good_path)
    before = model.state_dict()
    x = np.ones((2, 3))
    pred = model.predict(x)
    bad = tmp_path / "bad.npz"
    damage(bad, good_path.read_bytes())
    with pytest.raises(ValueError, match="fastrnn.load"):
        fastrnn.load(bad)
    # nothing else was disturbed: the model, its file, and loading still work
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    assert np.array_equal(model.predict(x), pred)
    assert _same_state(fastrnn.load(good_path), model)
    model.save(bad)
    assert _same_state(fastrnn.load(bad), model)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastrnn.load(tmp_path / "nope.npz")


def test_good_config_helper_loads(tmp_path):
    """The hand-written files above are damaged only where intended."""
    _npz(tmp_path / "ok.npz", _good_config())
    loaded = fastrnn.load(tmp_path / "ok.npz")
    assert isinstance(loaded.layers[0], fastrnn.Linear)
    assert not loaded.layers[0].weight.any()


# --- errors ----------------------------------------------------------------------------
def test_sequential_errors():
    x, y = _small_data(n=8)
    model = _small_model()
    with pytest.raises(RuntimeError, match=r"Sequential.fit: call compile"):
        model.fit(x, y, verbose=0)
    with pytest.raises(RuntimeError, match=r"Sequential.evaluate: call compile"):
        model.evaluate(x, y)
    with pytest.raises(RuntimeError, match=r"Sequential.train_step: call compile"):
        model.train_step(x, y)
    assert model.predict(x).shape == (8, 2)  # inference needs no compile
    model.compile()
    with pytest.raises(ValueError, match="x and y must have the same number of samples"):
        model.fit(x, y[:7], verbose=0)
    with pytest.raises(ValueError, match="x and y must have the same number of samples"):
        model.evaluate(x[:5], y)
    with pytest.raises(ValueError, match="x and y must have the same number of samples"):
        model.fit(x, y, validation_data=(x[:3], y[:2]), verbose=0)
    with pytest.raises(TypeError, match="validation_data must be a pair"):
        model.fit(x, y, validation_data=x, verbose=0)
    with pytest.raises(TypeError, match=r"layers\[1\] is a ndarray, not a fastrnn layer"):
        fastrnn.Sequential([fastrnn.Linear(2, 2), np.zeros(3)])
    with pytest.raises(TypeError, match=r"layers\[0\] is a LSTMCell, not a fastrnn layer"):
        fastrnn.Sequential([fastrnn.LSTMCell(2, 3)])
    with pytest.raises(TypeError, match="non-empty list"):
        fastrnn.Sequential([])
    with pytest.raises(TypeError, match="non-empty list"):
        fastrnn.Sequential(fastrnn.Linear(2, 2))


def test_load_state_dict_failure_leaves_model_unchanged():
    model = _small_model()
    x, _ = _small_data(n=4)
    before, pred = model.state_dict(), model.predict(x)
    good = model.state_dict()
    changed = {k: v + 1 for k, v in good.items()}

    def unchanged():
        return all(
            np.array_equal(before[k], v) for k, v in model.state_dict().items()) and \
            np.array_equal(model.predict(x), pred)

    with pytest.raises(ValueError, match="unexpected keys"):
        model.load_state_dict(dict(changed, **{"9.weight": np.zeros(2)}))
    assert unchanged()
    with pytest.raises(ValueError, match="missing keys"):
        model.load_state_dict({k: v for k, v in changed.items() if k != "4.bias"})
    assert unchanged()
    # a bad value in the LAST layer: the earlier layers (checked and copied first) roll back
    bad_shape = dict(changed, **{"4.weight": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="Linear: expected weight of shape"):
        model.load_state_dict(bad_shape)
    assert unchanged()
    bad_value = dict(changed, **{"4.bias": np.array([0.0, np.nan])})
    with pytest.raises(ValueError, match="non-finite"):
        model.load_state_dict(bad_value)
    assert unchanged()
    with pytest.raises(TypeError, match="load_state_dict expects a mapping"):
        model.load_state_dict([("0.weight_ih_l0", 1)])
    assert unchanged()
    model.load_state_dict(changed)
    assert all(np.array_equal(changed[k], v) for k, v in model.state_dict().items())


# --- LastStep and Dropout -----------------------------------------------------------
@pytest.mark.parametrize("num_layers", [1, 2])
def test_last_step_bidirectional_is_final_states(num_layers):
    gru = fastrnn.GRU(3, 4, num_layers=num_layers, batch_first=True, bidirectional=True,
                      dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((5, 7, 3))
    out, h_n = gru(x)
    expected = np.concatenate([h_n[-2], h_n[-1]], axis=1)  # top layer: forward, reverse
    got = fastrnn.LastStep(bidirectional=True)(out)
    assert np.array_equal(got, expected)
    model = fastrnn.Sequential([gru, fastrnn.LastStep(bidirectional=True)])
    assert np.array_equal(model.predict(x), expected)
    # the plain LastStep takes the reverse half at the last step, which is not h_n
    plain = fastrnn.LastStep()(out)
    assert np.array_equal(plain[:, :4], h_n[-2])
    assert not np.allclose(plain[:, 4:], h_n[-1])


def test_last_step_backprop_and_errors():
    x = np.random.default_rng(1).standard_normal((2, 5, 6))
    for bidirectional in (False, True):
        step = fastrnn.LastStep(bidirectional=bidirectional)
        y, backprop = step._seq_train(x)
        dy = np.random.default_rng(2).standard_normal(y.shape)
        dx = backprop(dy)
        # the adjoint of a selection: <dy, y> = <dx, x>
        assert np.sum(dy * y) == pytest.approx(np.sum(dx * x), rel=1e-13)
        assert np.count_nonzero(dx) == dy.size
    with pytest.raises(ValueError, match=r"LastStep: expected a batch-first sequence"):
        fastrnn.LastStep()(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="LastStep: bidirectional input needs an even"):
        fastrnn.LastStep(bidirectional=True)(np.zeros((2, 3, 5)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_dropout_training_and_inference(dtype, p):
    drop = fastrnn.Dropout(p, seed=0)
    x = np.random.default_rng(1).uniform(1, 2, size=(50, 40, 20)).astype(dtype)
    assert np.array_equal(drop(x), x)  # inference: identity
    assert np.array_equal(drop._seq_infer(x), x)
    y, backprop = drop._seq_train(x)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    kept = y != 0
    n = x.size
    rate = 1 - kept.mean()
    assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n)  # ~5 sigma
    scale = x.dtype.type(1) / x.dtype.type(1 - p)
    assert_rel(y[kept], x[kept] * scale, RTOL[dtype])
    dy = np.random.default_rng(2).uniform(1, 2, size=x.shape).astype(dtype)
    dx = backprop(dy)
    assert np.array_equal(dx != 0, kept)  # the same mask
    assert_rel(dx[kept], dy[kept] * scale, RTOL[dtype])
    # a new forward draws a new mask; the same seed, the same masks
    y2, _ = drop._seq_train(x)
    assert not np.array_equal(y2 != 0, kept)
    assert np.array_equal(fastrnn.Dropout(p, seed=0)._seq_train(x)[0], y)


def test_dropout_on_integer_input():
    drop = fastrnn.Dropout(0.5, seed=0)
    x = np.ones((20, 10), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y, backprop = drop._seq_train(x)
    assert np.isfinite(y).all()
    assert set(np.unique(y)) <= {0.0, 2.0}


def test_dropout_in_sequential_only_in_training():
    x, y = _small_data(n=6)
    a = _small_model()
    b = _small_model()
    b.layers[1] = fastrnn.Dropout(0.0)
    assert np.array_equal(a.predict(x), b.predict(x))
    a.compile("mse", optim.SGD(lr=0.0))
    b.compile("mse", optim.SGD(lr=0.0))
    assert a.evaluate(x, y) == b.evaluate(x, y)
    assert a.train_step(x, y) != b.train_step(x, y)  # training drops
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        fastrnn.Dropout(1.0)
    assert np.array_equal(fastrnn.Dropout(0.0)._seq_train(x)[0], x)


def test_evaluate_and_predict_in_batches():
    x, y = _small_data(n=37)
    model = _small_model()
    model.compile()
    full = model.evaluate(x, y)
    assert model.evaluate(x, y, batch_size=8) == pytest.approx(full, rel=1e-5)
    assert_rel(model.predict(x, batch_size=5), model.predict(x), 1e-5)
    assert model.predict(x, batch_size=5).shape == (37, 2)


def test_train_step_with_clipping_matches_manual_clip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 2))
    y = 10 * rng.standard_normal((4, 2))
    for kwargs in ({"clip_grad_norm": 0.1}, {"clip_grad_value": 0.01}):
        model, _, _, _ = _grad_case("a")
        state = model.state_dict()
        _, grads, _ = _manual_grads(model, fastrnn.MSELoss(), x, y)
        if "clip_grad_norm" in kwargs:
            total = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
            assert total > 0.1
            grads = {k: g * 0.1 / (total + 1e-6) for k, g in grads.items()}
        else:
            grads = {k: np.clip(g, -0.01, 0.01) for k, g in grads.items()}
        model.compile("mse", optim.SGD(lr=1.0), **kwargs)
        model.train_step(x, y)
        after = model.state_dict()
        for k in state:
            assert_rel(state[k] - after[k], grads[k], 1e-10, f"{kwargs} {k}")


def test_compile_refuses_an_optimizer_bound_to_other_parameters():
    model = fastrnn.Sequential([fastrnn.Linear(3, 2, seed=0)])
    other = fastrnn.Linear(3, 2, seed=1)
    with pytest.raises(ValueError, match="built for other parameters"):
        model.compile(loss="mse", optimizer=fastrnn.optim.Adam([other]))
    model.compile(loss="mse", optimizer=fastrnn.optim.Adam(model))   # bound to the model: fine


def test_saved_file_has_default_permissions(tmp_path):
    import os
    model = fastrnn.Sequential([fastrnn.Linear(3, 2, seed=0)])
    path = tmp_path / "m.npz"
    model.save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]   # no temporary file left behind


def test_more_argument_checks():
    model = fastrnn.Sequential([fastrnn.Linear(3, 2, seed=0)])
    model.compile()
    x, y = np.ones((4, 3)), np.ones((4, 2))
    with pytest.raises(ValueError, match="Sequential.evaluate: batch_size must be >= 1"):
        model.evaluate(x, y, batch_size=-1)
    with pytest.raises(TypeError, match="Sequential.predict: batch_size must be an int"):
        model.predict(x, batch_size="2")
    with pytest.raises(TypeError, match="BCEWithLogitsLoss: pos_weight must have a real"):
        fastrnn.BCEWithLogitsLoss(pos_weight="x")
    with pytest.raises(ValueError, match="pos_weight must be finite and >= 0"):
        fastrnn.BCEWithLogitsLoss(pos_weight=-1.0)
    with pytest.raises(TypeError, match="EarlyStopping: min_delta must be a number"):
        fastrnn.EarlyStopping(min_delta="x")
    with pytest.raises(ValueError, match=r"LastStep: expected .* with T >= 1"):
        fastrnn.LastStep()(np.ones((2, 0, 3)))
    history = model.fit(x, y, validation_split=np.float32(0.25), verbose=0)
    assert "val_loss" in history.history


def test_modules_and_models_pickle_to_identical_behaviour():
    import pickle
    rng = np.random.default_rng(0)
    seq = rng.standard_normal((5, 2, 3))
    cases = [  # module, input, how to get the output array
        (fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True, dropout=0.3, seed=1), seq,
         lambda m, x: m(x)[0]),
        (fastrnn.GRU(3, 4, batch_first=True, dtype="float64", seed=2), seq, lambda m, x: m(x)[0]),
        (fastrnn.RNN(3, 4, nonlinearity="relu", bias=False, seed=3), seq, lambda m, x: m(x)[0]),
        (fastrnn.GRUCell(3, 4, seed=4), seq[0], lambda m, x: m(x)),
        (fastrnn.GRUCell(3, 4, reset_after=False, seed=6), seq[0], lambda m, x: m(x)),
        (fastrnn.Linear(3, 2, seed=5), seq, lambda m, x: m(x)),
    ]
    for module, x, output in cases:
        copy = pickle.loads(pickle.dumps(module))
        assert repr(copy) == repr(module)
        for name, value in module.state_dict().items():
            np.testing.assert_array_equal(copy.state_dict()[name], value)
        np.testing.assert_array_equal(output(copy, x), output(module, x))
    lstm = cases[0][0]
    copy = pickle.loads(pickle.dumps(lstm))
    (a, _), _ = lstm.forward_train(seq)
    (b, _), _ = copy.forward_train(seq)
    np.testing.assert_array_equal(a, b)                  # same rng state: same dropout masks
    model = fastrnn.Sequential([fastrnn.Linear(3, 2, seed=0)])
    model.compile()
    copy = pickle.loads(pickle.dumps(model))
    with pytest.raises(RuntimeError, match="compile"):
        copy.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    np.testing.assert_array_equal(copy.predict(np.ones((4, 3))), model.predict(np.ones((4, 3))))


def test_centered_rmsprop_survives_a_gradient_whose_square_overflows_float32():
    """PyTorch's addcmul rounds s - ga^2 once, so a float32 gradient of 1e30
    (its square past float32's range) leaves the weight as it was; fastrnn's
    s - ga * ga was inf - inf, and the weight became NaN."""
    lin = fastrnn.Linear(1, 1, bias=False, seed=0)
    before = lin.weight.copy()
    opt = optim.RMSprop(lin, lr=0.01, centered=True)
    lin.grads["weight"][...] = 1e30
    opt.step()
    np.testing.assert_array_equal(lin.weight, before)
    if torch is not None:
        tw = torch.nn.Parameter(torch.from_numpy(before.copy()))
        topt = torch.optim.RMSprop([tw], lr=0.01, centered=True)
        tw.grad = torch.full_like(tw, 1e30)
        topt.step()
        np.testing.assert_array_equal(lin.weight, tw.detach().numpy())


def _numpy_adam(p, g, state, lr, betas, eps, weight_decay, amsgrad, decoupled):
    """Adam's update as NumPy whole-array operations (the form fastrnn's fused
    pass must match bit for bit)."""
    beta1, beta2 = betas
    g = g.copy()
    if weight_decay:
        if decoupled:
            p *= 1 - lr * weight_decay
        else:
            g += weight_decay * p
    if not state:
        state.update(step=0, m=np.zeros_like(p), v=np.zeros_like(p))
        if amsgrad:
            state["vmax"] = np.zeros_like(p)
    state["step"] += 1
    m, v = state["m"], state["v"]
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    if amsgrad:
        np.maximum(state["vmax"], v, out=state["vmax"])
        v = state["vmax"]
    t = state["step"]
    denom = np.sqrt(v) / math.sqrt(1 - beta2 ** t) + eps
    p -= lr / (1 - beta1 ** t) * m / denom


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cls, kwargs", [
    (optim.Adam, dict(lr=1e-2)), (optim.Adam, dict(lr=3e-3, weight_decay=0.1, amsgrad=True)),
    (optim.AdamW, dict(lr=1e-2)), (optim.AdamW, dict(lr=1e-3, weight_decay=0.3, amsgrad=True,
                                                     betas=(0.8, 0.95), eps=1e-6))])
def test_adams_fused_update_gives_the_numpy_forms_bits(dtype, cls, kwargs):
    """Adam's update runs in one pass (_backward.adam_update), each operation
    rounded as NumPy's whole-array form rounds it: the same bits over many
    steps, NaN and inf gradients included."""
    rng = np.random.default_rng(0)
    layer = fastrnn.GRU(3, 5, dtype=dtype, seed=0)
    opt = cls(layer, **kwargs)
    params = {k: v.copy() for k, v in layer.state_dict().items()}
    states = {k: {} for k in params}
    full = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False)
    full.update(kwargs)
    full.update(weight_decay=kwargs.get("weight_decay", 1e-2 if cls is optim.AdamW else 0.0))
    for step in range(12):
        grads = {k: (rng.standard_normal(v.shape) * 10.0 ** rng.integers(-6, 4)).astype(dtype)
                 for k, v in params.items()}
        if step == 7:   # a gradient that overflowed somewhere
            grads["weight_hh_l0"][0, 0] = np.inf
            grads["bias_ih_l0"][1] = np.nan
        layer.zero_grad()
        for k, g in grads.items():
            layer.grads[k][...] = g
        with np.errstate(invalid="ignore", over="ignore"):
            opt.step()
            for k in params:
                _numpy_adam(params[k], grads[k], states[k], decoupled=cls is optim.AdamW,
                            **full)
        got = layer.state_dict()
        for k in params:
            np.testing.assert_array_equal(got[k], params[k], err_msg=f"{k} step {step}")


# --- the data's gradient, which Sequential's training step throws away -------------------------
def _input_grads_counted(monkeypatch):
    from fastrnn import _engine
    calls = []
    real = _engine._backward

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def input_grad(self, **kwargs):
            calls.append(kwargs["dx"].shape)
            return real.input_grad(**kwargs)

    for engine in (_engine, _engine._layernorm_engine, _engine._projection_engine):
        monkeypatch.setattr(engine, "_backward", Counting())
    return calls


@pytest.mark.parametrize("make, needed", [
    (lambda: [fastrnn.GRU(5, 6, batch_first=True, seed=0), fastrnn.LastStep(),
              fastrnn.Linear(6, 2, seed=1)], []),
    (lambda: [fastrnn.Masking(0.0), fastrnn.LSTM(5, 6, num_layers=2, batch_first=True, seed=0),
              fastrnn.LastStep(), fastrnn.Linear(6, 2, seed=1)], [(28, 6)]),
    (lambda: [fastrnn.Reversed(fastrnn.GRU(5, 6, batch_first=True, recurrent_dropout=0.2,
                                           seed=0)),
              fastrnn.GRU(6, 4, batch_first=True, seed=2), fastrnn.LastStep(),
              fastrnn.Linear(4, 2, seed=1)], [(28, 6)]),
    (lambda: [fastrnn.LSTM(5, 6, batch_first=True, layer_norm=True, seed=0), fastrnn.LastStep(),
              fastrnn.Linear(6, 2, seed=1)], []),
    (lambda: [fastrnn.LSTM(5, 6, batch_first=True, proj_size=3, seed=0), fastrnn.LastStep(),
              fastrnn.Linear(3, 2, seed=1)], [])])
def test_a_training_step_computes_no_gradient_of_the_data(make, needed, monkeypatch):
    """Sequential's training step computes no dx = dG . W_ih for its first
    recurrent layer (a product as large as W_ih's weight gradient, which it
    threw away; Keras and PyTorch compute none): only the dx the layers after
    it read (a second layer's, a stacked layer's lower one). The trained
    weights are those of the step with it, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 7, 5)).astype(np.float32)
    y = rng.standard_normal((4, 2)).astype(np.float32)
    models = []
    for discard in (True, False):
        model = fastrnn.Sequential(make(), seed=3).compile("mse", optim.Adam(lr=0.01))
        if not discard:
            monkeypatch.setattr(model, "_first_trained", lambda: -1)
        calls = _input_grads_counted(monkeypatch)
        for _ in range(3):
            model.train_step(x, y)
        assert calls == (needed if discard else needed + [(28, 5)]) * 3
        models.append(model)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        np.testing.assert_array_equal(a, b)


def test_linear_trains_on_scipys_blas_held_at_one_thread(monkeypatch):
    """Linear's backprop (and a float64 Linear's forward) multiply through
    _parallel.matmul, scipy's BLAS at one thread: numpy's own BLAS threads,
    idle, spun and took the core from fastrnn's (a per-step Linear(128, 10)
    after an LSTM 64->128, B=32, T=100: a training step 35 ms instead of 15,
    PyTorch 18). [failed before: numpy's @]"""
    from fastrnn import _parallel
    from fastrnn import nn as fnn
    calls = []
    real = _parallel.matmul

    def counting(a, b):
        calls.append((a.shape, b.shape))
        return real(a, b)

    monkeypatch.setattr(fnn._parallel, "matmul", counting)
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        calls.clear()
        model = fastrnn.Sequential([fastrnn.Linear(4, 3, dtype=dtype, seed=0)])
        model.compile("mse", optim.SGD(lr=0.1))
        x, y = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
        model.train_step(x, y)
        forward = [((10, 4), (4, 3))] if dtype == "float64" else []
        assert calls == forward + [((3, 10), (10, 4)), ((10, 3), (3, 4))]


def test_a_hyper_parameter_set_after_construction_is_checked_and_the_state_follows(tmp_path):
    """Settings changed by hand are checked as the constructor checks them
    (they had been taken, then failed in the middle of fit or made a file
    loading refused), and a change of the arrays a parameter's state keeps
    drops the unused ones and starts the new ones as a first step does: the
    model still trains, saves and loads."""
    sgd, adam, rms = optim.SGD(momentum=0.9, nesterov=True), optim.Adam(), optim.RMSprop()
    for opt, name, value, error, message in (
            (sgd, "momentum", -0.5, ValueError, "SGD: momentum must lie in"),
            (sgd, "momentum", 0.0, ValueError, "SGD: nesterov needs momentum > 0"),
            (adam, "betas", (0.9, 1.5), ValueError, "Adam: betas must lie in"),
            (adam, "eps", "1e-8", TypeError, "Adam: eps must be a number, got '1e-8'"),
            (rms, "centered", "yes", TypeError, "RMSprop: centered must be a bool")):
        before = getattr(opt, name)
        with pytest.raises(error, match=message):
            setattr(opt, name, value)
        assert getattr(opt, name) == before
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 5, 3)), rng.standard_normal((8, 2))
    for make, name, value in ((lambda: optim.SGD(lr=0.01, momentum=0.9), "momentum", 0.0),
                              (lambda: optim.SGD(lr=0.01), "momentum", 0.9),
                              (lambda: optim.Adam(lr=0.01), "amsgrad", True),
                              (lambda: optim.Adam(lr=0.01, amsgrad=True), "amsgrad", False),
                              (lambda: optim.RMSprop(lr=0.01), "momentum", 0.9),
                              (lambda: optim.RMSprop(lr=0.01), "centered", True)):
        model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, seed=0),
                                    fastrnn.LastStep(), fastrnn.Linear(4, 2, seed=1)])
        model.compile("mse", make())
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
        setattr(model.optimizer, name, value)
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
        model.save(tmp_path / "m.npz")
        loaded = fastrnn.load(tmp_path / "m.npz")
        assert getattr(loaded.optimizer, name) == value
        for a, b in zip(model.optimizer.state_dict()["state"],
                        loaded.optimizer.state_dict()["state"]):
            assert set(a) == set(b)


class _UsersAdam(optim.Adam):
    """A subclass of another module than fastrnn.optim, with its own
    constructor."""
    def __init__(self, params=None, lr=0.01):
        super().__init__(params, lr=lr)


def test_a_hyper_parameter_set_on_a_subclass_of_another_module_is_checked_too():
    """A user's subclass of Adam took amsgrad=True set by hand unchecked and
    without its state following: the next step raised KeyError
    ('max_exp_avg_sq'); betas=(0.9, 1.5) was taken. Now checked as the
    fastrnn class it extends checks it."""
    opt = _UsersAdam()
    with pytest.raises(ValueError, match="Adam: betas must lie in"):
        opt.betas = (0.9, 1.5)
    assert opt.betas == (0.9, 0.999)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 5, 3)), rng.standard_normal((8, 2))
    model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, seed=0),
                                fastrnn.LastStep(), fastrnn.Linear(4, 2, seed=1)])
    model.compile("mse", opt)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    opt.amsgrad = True
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert all("max_exp_avg_sq" in state for state in opt.state_dict()["state"])


def test_an_interrupted_schedule_step_moves_the_epoch_and_the_rate_together():
    """A Ctrl-C inside LRScheduler.step between its epoch's count and the
    rate's set (the lr property's checks) left the schedule an epoch ahead
    of the rate: a chained StepLR lost that decay for good, and save kept
    the pair. Interrupted at each Python call or return within the step,
    the two now move together or not at all."""
    import sys

    def interrupted_at(k):
        opt = optim.SGD(lr=1.0)
        schedule = optim.StepLR(opt, step_size=1, gamma=0.5)
        events = [0]
        here = sys._getframe().f_code

        def profile(frame, event, arg):
            # (within the step: not this function's own calls around it)
            if frame.f_code is not here and event in ("call", "return", "c_call", "c_return"):
                events[0] += 1
                if events[0] == k:
                    sys.setprofile(None)
                    raise KeyboardInterrupt
        sys.setprofile(profile)
        try:
            schedule.step()
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        return schedule, opt, events[0]

    _, _, total = interrupted_at(10**9)
    assert total > 3
    for k in range(1, total + 1):
        schedule, opt, _ = interrupted_at(k)
        assert opt.lr == 0.5 ** schedule.epoch, (k, schedule.epoch, opt.lr)
