"""Loss reductions, class weights and label smoothing against PyTorch; the
epoch loss of fit and evaluate as the mean over everything the loss averages;
sample and class weights against Keras' definitions.
"""
import warnings

import numpy as np
import pytest

import fastrnn
from fastrnn import optim

# Keras (TensorFlow) warns about numpy 2 internally
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _torch():
    return pytest.importorskip("torch")


def _torch_loss(name, pred, target, **kwargs):
    """(value, dpred) of torch.nn.functional's loss; classes moved to axis 1."""
    torch = _torch()
    F = torch.nn.functional
    p = torch.tensor(pred, requires_grad=True)
    if name == "cross_entropy":
        logits = p if p.ndim <= 2 else p.movedim(-1, 1)
        value = F.cross_entropy(logits, torch.tensor(target), **kwargs)
    else:
        value = getattr(F, name)(p, torch.tensor(target), **kwargs)
    value.sum().backward()
    return value.detach().numpy(), p.grad.numpy()


def _check(loss, pred, target, name, rtol, **kwargs):
    value, grad = loss.value_and_grad(pred, target)
    ref_value, ref_grad = _torch_loss(name, pred, target, **kwargs)
    assert grad.shape == pred.shape and grad.dtype == pred.dtype
    np.testing.assert_allclose(np.asarray(value), ref_value, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol)
    if loss.reduction == "none":
        assert isinstance(value, np.ndarray) and value.shape == ref_value.shape
    else:
        assert isinstance(value, float)
        assert loss(pred, target) == value


RTOL = {"float32": 2e-6, "float64": 1e-12}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["mse", "l1", "huber", "bce"])
def test_elementwise_losses_reduce_as_torch(dtype, reduction, case):
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((3, 4, 2)).astype(dtype)
    target = rng.standard_normal((3, 4, 2)).astype(dtype)
    if case == "mse":
        _check(fastrnn.MSELoss(reduction=reduction), pred, target, "mse_loss", RTOL[dtype],
               reduction=reduction)
    elif case == "l1":
        _check(fastrnn.L1Loss(reduction=reduction), pred, target, "l1_loss", RTOL[dtype],
               reduction=reduction)
    elif case == "huber":
        _check(fastrnn.HuberLoss(0.6, reduction=reduction), pred, target, "huber_loss",
               RTOL[dtype], reduction=reduction, delta=0.6)
    else:
        torch = _torch()
        soft = rng.random((3, 4, 2)).astype(dtype)
        pos_weight = np.array([0.5, 3.0], dtype)
        _check(fastrnn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction=reduction), pred,
               soft, "binary_cross_entropy_with_logits", RTOL[dtype], reduction=reduction,
               pos_weight=torch.tensor(pos_weight))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)])
def test_cross_entropy_weight_and_label_smoothing_match_torch(dtype, reduction, weighted,
                                                              smoothing, shape):
    torch = _torch()
    rng = np.random.default_rng(1)
    pred = (2 * rng.standard_normal(shape)).astype(dtype)
    target = rng.integers(0, 5, size=shape[:-1])
    target.flat[1] = -100                      # an ignored target
    weight = (rng.random(5) + 0.2) if weighted else None
    loss = fastrnn.CrossEntropyLoss(weight=weight, reduction=reduction,
                                    label_smoothing=smoothing)
    _check(loss, pred, target, "cross_entropy", RTOL[dtype], reduction=reduction,
           label_smoothing=smoothing,
           weight=None if weight is None else torch.tensor(weight.astype(dtype)))
    assert not loss.value_and_grad(pred, target)[1].reshape(-1, 5)[1].any()


def test_loss_gradients_of_the_new_options_match_finite_differences():
    from reference import numeric_grad
    rng = np.random.default_rng(2)
    pred = rng.standard_normal((3, 4, 3))
    classes = rng.integers(0, 3, size=(3, 4))
    classes[0, 1] = -100
    cases = [(fastrnn.CrossEntropyLoss(weight=[0.3, 2.0, 1.0], label_smoothing=0.2), classes),
             (fastrnn.CrossEntropyLoss(reduction="sum", label_smoothing=0.5), classes),
             (fastrnn.MSELoss(reduction="sum"), rng.standard_normal((3, 4, 3)))]
    for loss, target in cases:
        p = pred.copy()
        analytic = loss.value_and_grad(p, target)[1]
        numeric = numeric_grad(lambda: loss(p, target), p)
        np.testing.assert_allclose(analytic, numeric, atol=1e-7)


def test_loss_argument_errors():
    with pytest.raises(ValueError, match=r"MSELoss: reduction must be 'mean', 'sum' or 'none', "
                                         r"got 'avg'"):
        fastrnn.MSELoss(reduction="avg")
    with pytest.raises(TypeError, match=r"HuberLoss: reduction must be a str"):
        fastrnn.HuberLoss(reduction=None)
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: label_smoothing must lie in "
                                         r"\[0, 1\], got 1.5"):
        fastrnn.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(TypeError, match=r"CrossEntropyLoss: label_smoothing must be a number"):
        fastrnn.CrossEntropyLoss(label_smoothing="0.1")
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: expected weight of shape \(C,\)"):
        fastrnn.CrossEntropyLoss(weight=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: weight must be finite and >= 0"):
        fastrnn.CrossEntropyLoss(weight=[1.0, -1.0])
    with pytest.raises(TypeError, match=r"CrossEntropyLoss: weight must have a real numeric dtype"):
        fastrnn.CrossEntropyLoss(weight=["a", "b"])
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: weight has 2 entries but pred has "
                                         r"3 classes"):
        fastrnn.CrossEntropyLoss(weight=[1.0, 2.0])(np.zeros((4, 3)), np.zeros(4, int))
    model = fastrnn.Sequential([fastrnn.Linear(2, 1)])
    with pytest.raises(ValueError, match=r"Sequential.compile: the loss's reduction must be "
                                         r"'mean' or 'sum'"):
        model.compile(fastrnn.MSELoss(reduction="none"))
    assert repr(fastrnn.CrossEntropyLoss(weight=[1, 2], label_smoothing=0.1, reduction="sum")) \
        == ("CrossEntropyLoss(ignore_index=-100, weight=[1.0, 2.0], label_smoothing=0.1, "
            "reduction='sum')")


def test_every_target_ignored_still_gives_zero_for_every_reduction():
    pred = np.random.default_rng(3).standard_normal((2, 3, 4))
    target = np.full((2, 3), -100)
    for reduction in ("mean", "sum"):
        value, grad = fastrnn.CrossEntropyLoss(reduction=reduction,
                                               label_smoothing=0.3).value_and_grad(pred, target)
        assert value == 0.0 and not grad.any()


# --- the epoch's loss ------------------------------------------------------------------------
def _per_step_classifier(seed=0):
    model = fastrnn.Sequential([fastrnn.GRU(2, 5, batch_first=True, dtype="float64", seed=seed),
                                fastrnn.Linear(5, 3, dtype="float64", seed=seed + 1)],
                               seed=seed + 2)
    model.compile(fastrnn.CrossEntropyLoss(), optim.SGD(lr=0.0))
    return model


def test_epoch_loss_weights_batches_by_their_counted_targets():
    """With ignored targets, the epoch's loss is the loss of all the data at
    once, not the mean of the batch means (which would overweight a batch of
    mostly padding)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 6, 2))
    y = rng.integers(0, 3, size=(8, 6))
    y[:4, 1:] = -100                            # the first batch is mostly padding
    model = _per_step_classifier()
    history = model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
    whole = fastrnn.CrossEntropyLoss()(model.predict(x), y)
    assert history.history["loss"][0] == pytest.approx(whole, rel=1e-12)
    first = fastrnn.CrossEntropyLoss()(model.predict(x[:4]), y[:4])
    second = fastrnn.CrossEntropyLoss()(model.predict(x[4:]), y[4:])
    assert abs((first + second) / 2 - whole) > 1e-3       # the old, wrong answer differs
    assert model.evaluate(x, y, batch_size=4) == pytest.approx(whole, rel=1e-12)
    assert model.evaluate(x, y, batch_size=3) == pytest.approx(whole, rel=1e-12)


def test_sum_reduction_epoch_loss_averages_batch_sums_by_samples():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    model = fastrnn.Sequential([fastrnn.Linear(3, 2, dtype="float64", seed=0)])
    model.compile(fastrnn.MSELoss(reduction="sum"), optim.SGD(lr=0.0))
    history = model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
    pred = model.predict(x)
    sums = [((pred[i:i + 4] - y[i:i + 4]) ** 2).sum() for i in (0, 4, 8)]
    expected = (4 * sums[0] + 4 * sums[1] + 2 * sums[2]) / 10
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)


# --- sample_weight and class_weight (Keras' rule) ---------------------------------------------
def test_sample_weight_maths_is_keras():
    """Keras: sum(w_i * loss_i) / N, the divisor not weighted; per-step
    weights and padding masks likewise."""
    rng = np.random.default_rng(6)
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    w = np.array([0.0, 1.0, 2.0, 0.5])
    total, count, grad = fastrnn.MSELoss()._terms(pred, target, w)
    per_sample = ((pred - target) ** 2).mean(axis=1)
    assert total / count == pytest.approx((w * per_sample).sum() / 4, rel=1e-12)
    keras = pytest.importorskip("keras")
    ref = keras.losses.MeanSquaredError()(target, pred, sample_weight=w)
    assert total / count == pytest.approx(float(ref), rel=1e-6)
    ref = keras.losses.MeanAbsoluteError()(target, pred, sample_weight=w)
    total, count, _ = fastrnn.L1Loss()._terms(pred, target, w)
    assert total / count == pytest.approx(float(ref), rel=1e-6)
    labels = rng.integers(0, 3, size=4)
    ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, pred,
                                                                       sample_weight=w)
    total, count, _ = fastrnn.CrossEntropyLoss()._terms(pred, labels, w)
    assert total / count == pytest.approx(float(ref), rel=1e-6)


def test_mask_takes_padded_steps_out_of_the_mean():
    rng = np.random.default_rng(7)
    pred, target = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))
    mask = np.array([[True, True, True, True], [True, False, False, False]])
    total, count, grad = fastrnn.MSELoss()._terms(pred, target, mask=mask)
    kept = ((pred - target) ** 2)[mask]
    assert count == kept.size and total == pytest.approx(kept.sum(), rel=1e-12)
    assert not grad[1, 1:].any()


def _keras_dense(weights, bias, lr):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((weights.shape[1],)),
                              keras.layers.Dense(weights.shape[0])])
    model.layers[0].set_weights([weights.T, bias])
    return model


@pytest.mark.parametrize("kind", ["class_weight", "sample_weight"])
def test_fit_weights_match_keras(kind):
    """One full-batch SGD step with class (or sample) weights: the same loss
    and the same updated weights as Keras."""
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((12, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 12)
    layer = fastrnn.Linear(3, 3, seed=0)
    weights, bias = layer.weight.copy(), layer.bias.copy()
    model = fastrnn.Sequential([layer], seed=0)
    model.compile(fastrnn.CrossEntropyLoss(), optim.SGD(lr=0.1))
    ref = _keras_dense(weights, bias, 0.1)
    ref.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=keras.optimizers.SGD(learning_rate=0.1))
    extra = ({"class_weight": {0: 0.2, 1: 3.0}} if kind == "class_weight"
             else {"sample_weight": rng.random(12).astype(np.float32)})
    ours = model.fit(x, labels, epochs=1, batch_size=12, shuffle=False, verbose=0, **extra)
    theirs = ref.fit(x, labels, epochs=1, batch_size=12, shuffle=False, verbose=0, **extra)
    assert ours.history["loss"][0] == pytest.approx(theirs.history["loss"][0], rel=1e-5)
    kernel, kbias = ref.layers[0].get_weights()
    np.testing.assert_allclose(layer.weight, kernel.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.bias, kbias, rtol=1e-5, atol=1e-6)


def test_class_weight_of_one_hot_and_binary_targets():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 2))
    model = fastrnn.Sequential([fastrnn.Linear(2, 3, dtype="float64", seed=0)])
    model.compile("mse", optim.SGD(lr=0.0))
    one_hot = np.eye(3)[[0, 1, 2, 2, 1, 0]]
    history = model.fit(x, one_hot, class_weight={2: 4.0}, batch_size=6, verbose=0)
    pred = model.predict(x)
    w = np.where(one_hot.argmax(1) == 2, 4.0, 1.0)
    expected = (w * ((pred - one_hot) ** 2).mean(axis=1)).sum() / 6
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="pass class_weight or sample_weight, not both"):
        model.fit(x, one_hot, class_weight={0: 1.0}, sample_weight=np.ones(6), verbose=0)
    with pytest.raises(ValueError, match=r"pass class_weight or sample_weight, not both \(x's "
                                         r"batch 0 holds sample weights\)"):
        model.fit([(x, one_hot, np.zeros(6))], class_weight={0: 1.0}, verbose=0)
    with pytest.raises(TypeError, match="class_weight must be a dict"):
        model.fit(x, one_hot, class_weight=[1.0, 2.0], verbose=0)
    with pytest.raises(TypeError, match=r"class_weight's keys must be int class indices, got "
                                        r"'a'"):
        model.fit(x, one_hot, class_weight={"a": 1.0}, verbose=0)
    with pytest.raises(ValueError, match=r"class_weight\[1\] must be finite"):
        model.fit(x, one_hot, class_weight={1: float("nan")}, verbose=0)
    with pytest.raises(ValueError, match=r"expected sample_weight of shape \(6,\)"):
        model.fit(x, one_hot, sample_weight=np.ones(5), verbose=0)
    with pytest.raises(ValueError, match=r"sample_weight must be finite"):
        model.fit(x, one_hot, sample_weight=np.full(6, np.inf), verbose=0)


def test_class_weight_of_far_classes_needs_no_table_of_them():
    """Classes far apart (10**12: a dense table of max + 1 weights was a
    MemoryError of 7 TiB not naming class_weight; 10**7 took 76 MB) weigh
    the samples of theirs, classes absent from the dict 1; a class beyond
    int64 is refused by name."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 2))
    y = np.array([0, 10**12, 7, 10**12, 0, 3], np.float64)[:, None]
    model = fastrnn.Sequential([fastrnn.Linear(2, 1, dtype="float64", seed=0)])
    model.compile("mse", optim.SGD(lr=0.0))
    history = model.fit(x, y, class_weight={10**12: 4.0, 3: 0.5, 10**7: 9.0}, batch_size=6,
                        verbose=0)
    w = np.array([1.0, 4.0, 1.0, 4.0, 1.0, 0.5])
    expected = (w * ((model.predict(x) - y) ** 2)[:, 0]).sum() / 6
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"class_weight's keys must be class indices in "
                                         r"\[0, 2\*\*63\), got 1180591620717411303424"):
        model.fit(x, y, class_weight={2**70: 1.0}, verbose=0)


def test_class_weight_of_per_step_integer_targets_weights_each_step():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((4, 5, 2))
    y = rng.integers(0, 3, size=(4, 5))
    model = _per_step_classifier()
    history = model.fit(x, y, class_weight={1: 5.0}, batch_size=4, verbose=0)
    pred = model.predict(x)
    values = fastrnn.CrossEntropyLoss(reduction="none")(pred, y)
    expected = (np.where(y == 1, 5.0, 1.0) * values).sum() / y.size
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-12)


def test_bce_checks_its_targets_in_preds_dtype_and_names_the_value_exactly():
    """A float64 target of 1 + 1e-12 is exactly 1 in float32, the dtype the
    loss computes in: it was refused, with the message's 'got 1' hiding why.
    Outside [0, 1] in pred's dtype it is refused, the value shown in full."""
    loss = fastrnn.BCEWithLogitsLoss()
    pred = np.zeros((2, 1), np.float32)
    target = np.array([[1.0 + 1e-12], [0.0]])
    assert loss(pred, target) == pytest.approx(loss(pred, np.array([[1.0], [0.0]])))
    with pytest.raises(ValueError, match=r"got 1\.000000001 among the targets that count"):
        loss(pred.astype(np.float64), np.array([[1.0 + 1e-9], [0.0]]))


def test_cross_entropy_counting_only_classes_of_weight_zero_is_zero():
    """The documented choice where PyTorch's 0 / 0 gives NaN: a 'mean' over
    targets whose classes all weigh 0 is 0, its gradient zero."""
    loss = fastrnn.CrossEntropyLoss(weight=[0.0, 1.0, 2.0])
    pred = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    value, grad = loss.value_and_grad(pred, np.array([0, 0]))
    assert value == 0.0 and not grad.any()


def test_bce_names_a_refused_target_as_given():
    """Checked in pred's dtype, a target is still named as the user gave it:
    float32's rounding showed 1.1 as 1.100000023841858."""
    with pytest.raises(ValueError, match=r"got 1\.1 among the targets that count"):
        fastrnn.BCEWithLogitsLoss()(np.zeros((1, 1), np.float32), np.array([[1.1]]))


@pytest.mark.parametrize("loss", [fastrnn.MSELoss(), fastrnn.L1Loss(), fastrnn.HuberLoss(),
                                  fastrnn.BCEWithLogitsLoss()])
def test_a_nan_target_where_nothing_counts_adds_nothing(loss):
    """A target left NaN (a missing value) at a masked step or in a row
    weighted 0 adds 0 to the sum and its gradient, as a finite one does
    (0 times NaN had made the loss and then every weight NaN)."""
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((4, 5, 2)).astype(np.float32)
    target = rng.uniform(0, 1, (4, 5, 2)).astype(np.float32)
    mask = np.ones((4, 5), bool)
    mask[1, 3:] = False
    weight = np.array([1.0, 2.0, 0.0, 0.5], np.float32)
    holed = target.copy()
    holed[1, 3:] = np.nan
    holed[2] = np.nan
    for args in ((None, mask), (weight, mask)):
        expected = loss._terms(pred, target, *args)
        got = loss._terms(pred, holed if args[0] is not None else np.where(
            mask[..., None], target, np.nan).astype(np.float32), *args)
        assert got[0] == expected[0] and got[1] == expected[1]
        np.testing.assert_array_equal(got[2], expected[2])
    if isinstance(loss, fastrnn.MSELoss):   # inf * 0, thrown away, warns of nothing
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = loss._terms(pred, np.where(mask[..., None], target, np.inf), None, mask)
        assert got[0] == loss._terms(pred, target, None, mask)[0]


def test_fit_with_nan_targets_at_masked_steps_trains_as_with_finite_ones():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 3)).astype(np.float32)
    x[1, 3:] = 0.0                        # masked by Masking(0.0)
    y = rng.standard_normal((4, 5, 1)).astype(np.float32)
    holed = y.copy()
    holed[1, 3:] = np.nan
    models = []
    for target in (y, holed):
        model = fastrnn.Sequential([fastrnn.Masking(0.0),
                                    fastrnn.GRU(3, 4, batch_first=True, seed=0),
                                    fastrnn.Linear(4, 1, seed=1)])
        model.compile("mse", "sgd")
        assert np.isfinite(model.evaluate(x, target))
        model.fit(x, target, epochs=2, verbose=0, shuffle=False)
        models.append(model.state_dict())
    for name, value in models[0].items():
        np.testing.assert_array_equal(models[1][name], value)
