"""Metrics: each against Keras' own metric on the same batches (with and
without sample weights), the names compile resolves as Keras does, values in
fit's History and progress line and in evaluate, and steps that must not
count (ignored targets, padding) left out.
"""
import numpy as np
import pytest

import fastrnn
from fastrnn import metrics, optim

# Keras (TensorFlow) warns about numpy 2 internally
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _keras():
    return pytest.importorskip("keras")


def _batches(rng, kind):
    """Two batches of (y_true, y_pred) for a metric of this kind."""
    out = []
    for n in (5, 3):
        if kind == "binary":
            out.append((rng.integers(0, 2, (n, 3)).astype(np.float32),
                        rng.random((n, 3)).astype(np.float32)))
        elif kind == "categorical":
            out.append((np.eye(6, dtype=np.float32)[rng.integers(0, 6, n)],
                        rng.random((n, 6)).astype(np.float32)))
        elif kind == "sparse":
            out.append((rng.integers(0, 6, n), rng.random((n, 6)).astype(np.float32)))
        elif kind == "sparse_steps":
            out.append((rng.integers(0, 6, (n, 4)), rng.random((n, 4, 6)).astype(np.float32)))
        elif kind == "regression":
            out.append((rng.standard_normal((n, 2)).astype(np.float32),
                        rng.standard_normal((n, 2)).astype(np.float32)))
        else:   # regression per step
            out.append((rng.standard_normal((n, 4, 2)).astype(np.float32),
                        rng.standard_normal((n, 4, 2)).astype(np.float32)))
    return out


CASES = [
    ("BinaryAccuracy", {}, "binary"),
    ("BinaryAccuracy", {"threshold": 0.3}, "binary"),
    ("CategoricalAccuracy", {}, "categorical"),
    ("SparseCategoricalAccuracy", {}, "sparse"),
    ("SparseCategoricalAccuracy", {}, "sparse_steps"),
    ("TopKCategoricalAccuracy", {"k": 2}, "categorical"),
    ("SparseTopKCategoricalAccuracy", {"k": 3}, "sparse"),
    ("SparseTopKCategoricalAccuracy", {"k": 2}, "sparse_steps"),
    ("MeanAbsoluteError", {}, "regression"),
    ("MeanSquaredError", {}, "regression"),
    ("RootMeanSquaredError", {}, "regression"),
    ("MeanAbsoluteError", {}, "regression_steps"),
    ("RootMeanSquaredError", {}, "regression_steps"),
]


@pytest.mark.parametrize("name, kwargs, kind", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_metric_matches_keras(name, kwargs, kind, weighted):
    keras = _keras()
    rng = np.random.default_rng(abs(hash((name, kind))) % 1000)
    ours = getattr(metrics, name)(**kwargs)
    theirs = getattr(keras.metrics, name)(**kwargs)
    for y_true, y_pred in _batches(rng, kind):
        weight = rng.random(len(y_true)).astype(np.float32) if weighted else None
        ours.update_state(y_true, y_pred, weight)
        theirs.update_state(y_true, y_pred, sample_weight=weight)
    assert ours.result() == pytest.approx(float(theirs.result()), rel=1e-5, abs=1e-7)
    ours.reset_state()
    assert ours.result() == 0.0


def test_top_k_counts_ties_at_the_boundary_as_tensorflow():
    keras = _keras()
    y_true = np.array([0, 1, 2, 3])
    y_pred = np.array([[0.5, 0.5, 0.5, 0.1], [0.9, 0.2, 0.2, 0.2], [0.3, 0.3, 0.1, 0.0],
                       [0.1, 0.2, 0.3, 0.3]], np.float32)
    ours = metrics.SparseTopKCategoricalAccuracy(k=1)
    ours.update_state(y_true, y_pred)
    theirs = keras.metrics.SparseTopKCategoricalAccuracy(k=1)
    theirs.update_state(y_true, y_pred)
    assert ours.result() == pytest.approx(float(theirs.result()))


@pytest.mark.parametrize("sparse", [True, False])
def test_top_k_counts_a_row_with_a_non_finite_score_as_a_miss(sparse):
    """TensorFlow's in_top_k: a row holding NaN or inf anywhere is a miss. A
    NaN compared greater than nothing and counted as a hit: a diverged model
    (NaN outputs) scored 1.0."""
    nan, inf = np.nan, np.inf
    y_pred = np.array([[nan, nan, nan], [0.1, nan, 0.2], [inf, 0.0, 0.1], [nan, 0.5, 0.1],
                       [0.2, nan, nan], [-inf, 0.1, 0.2], [0.3, 0.1, 0.2]], np.float32)
    labels = np.array([0, 1, 0, 1, 0, 2, 0])
    want = np.array([0, 0, 0, 0, 0, 0, 1], np.float32)     # a hit: the finite row only
    k = 1
    if sparse:
        ours, y_true = metrics.SparseTopKCategoricalAccuracy(k=k), labels
    else:
        ours, y_true = metrics.TopKCategoricalAccuracy(k=k), np.eye(3, dtype=np.float32)[labels]
    ours.update_state(y_true, y_pred)
    assert ours.result() == pytest.approx(want.mean())
    keras = pytest.importorskip("keras")
    theirs = (keras.metrics.SparseTopKCategoricalAccuracy(k=k) if sparse
              else keras.metrics.TopKCategoricalAccuracy(k=k))
    theirs.update_state(y_true, y_pred)
    assert ours.result() == pytest.approx(float(theirs.result()))


@pytest.mark.parametrize("sparse", [True, False])
def test_accuracy_counts_a_row_with_a_nan_as_a_miss(sparse):
    """NumPy's argmax takes a NaN for the largest score: a diverged model's
    NaN outputs scored hits where the NaN fell on the target (all-NaN rows
    on class 0). A row holding a NaN is a miss, as in the top-k metrics;
    inf is a score like any other."""
    nan, inf = np.nan, np.inf
    y_pred = np.array([[nan, nan, nan], [0.1, nan, 0.2], [nan, 0.5, 0.1], [inf, 0.0, 0.1],
                       [0.3, 0.1, 0.2], [0.1, 0.2, 0.3]], np.float32)
    labels = np.array([0, 1, 0, 0, 0, 1])
    want = np.array([0, 0, 0, 1, 1, 0], np.float32)
    if sparse:
        ours, y_true = metrics.SparseCategoricalAccuracy(), labels
    else:
        ours, y_true = metrics.CategoricalAccuracy(), np.eye(3, dtype=np.float32)[labels]
    ours.update_state(y_true, y_pred)
    assert ours.result() == pytest.approx(want.mean())


def test_binary_accuracy_counts_a_nan_output_as_a_miss():
    """y_pred > threshold is False for NaN: a NaN output counted as a hit
    of every 0 target."""
    acc = metrics.BinaryAccuracy()
    acc.update_state(np.array([0.0, 1.0, 0.0, 1.0]), np.array([np.nan, np.nan, 0.2, 0.7]))
    assert acc.result() == 0.5


def test_sparse_targets_with_a_trailing_axis_and_binary_of_one_column():
    acc = metrics.SparseCategoricalAccuracy()
    acc.update_state(np.array([[1], [0]]), np.array([[0.1, 0.9], [0.2, 0.8]]))
    assert acc.result() == 0.5
    acc = metrics.BinaryAccuracy()
    acc.update_state(np.array([1.0, 0.0, 1.0]), np.array([[0.7], [0.6], [0.2]]))
    assert acc.result() == pytest.approx(1 / 3)


# --- compile(metrics=...) -------------------------------------------------------------------
def _dense_pair(n_in, n_out, seed=0):
    """A fastrnn Linear model and a Keras Dense model with the same weights."""
    keras = _keras()
    layer = fastrnn.Linear(n_in, n_out, seed=seed)
    model = fastrnn.Sequential([layer], seed=seed)
    ref = keras.Sequential([keras.Input((n_in,)), keras.layers.Dense(n_out)])
    ref.layers[0].set_weights([layer.weight.T.copy(), layer.bias.copy()])
    return model, ref


def test_fit_history_metrics_match_keras():
    """Frozen weights (lr 0): History's metrics, and their val_ values, are
    Keras' over batches of unequal size."""
    keras = _keras()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 4)).astype(np.float32)
    y = rng.integers(0, 7, 23)
    xv, yv = rng.standard_normal((9, 4)).astype(np.float32), rng.integers(0, 7, 9)
    model, ref = _dense_pair(4, 7)
    names = ["accuracy", "sparse_top_k_categorical_accuracy"]
    model.compile(fastrnn.CrossEntropyLoss(), optim.SGD(lr=0.0), metrics=names)
    ref.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=keras.optimizers.SGD(learning_rate=0.0), metrics=names)
    ours = model.fit(x, y, epochs=1, batch_size=5, shuffle=False, verbose=0,
                     validation_data=(xv, yv)).history
    theirs = ref.fit(x, y, epochs=1, batch_size=5, shuffle=False, verbose=0,
                     validation_data=(xv, yv)).history
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key][0] == pytest.approx(theirs[key][0], rel=1e-5), key


def test_accuracy_resolves_as_keras_and_thresholds_logits_at_zero():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 3))
    cases = [(fastrnn.BCEWithLogitsLoss(), 1, rng.integers(0, 2, (30, 1)).astype(float),
              metrics.BinaryAccuracy, 0.0),
             ("mse", 1, rng.integers(0, 2, (30, 1)).astype(float), metrics.BinaryAccuracy, 0.5),
             (fastrnn.CrossEntropyLoss(), 4, rng.integers(0, 4, 30),
              metrics.SparseCategoricalAccuracy, None),
             ("mse", 4, np.eye(4)[rng.integers(0, 4, 30)], metrics.CategoricalAccuracy, None)]
    for loss, n_out, y, cls, threshold in cases:
        model = fastrnn.Sequential([fastrnn.Linear(3, n_out, dtype="float64", seed=0)])
        model.compile(loss, optim.SGD(lr=0.0), metrics=["acc"])
        history = model.fit(x, y, batch_size=30, verbose=0)
        metric = model._metrics[0][0]
        assert type(metric) is cls and metric.name == "acc"
        if threshold is not None:
            assert metric.threshold == threshold
        fresh = cls() if threshold is None else cls(threshold=threshold)
        fresh.update_state(y, model.predict(x))
        assert history.history["acc"][0] == pytest.approx(fresh.result(), rel=1e-12)


def test_user_functions_names_and_evaluate_forms(capsys):
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 2))
    model = fastrnn.Sequential([fastrnn.Linear(3, 2, dtype="float64", seed=0)])

    def max_error(y_true, y_pred):
        return np.abs(y_true - y_pred).max(axis=-1)

    def batch_scalar(y_true, y_pred):
        return float(len(y_true))

    model.compile("mse", optim.SGD(lr=0.0),
                  metrics=["mae", "rmse", max_error, batch_scalar,
                           metrics.MeanSquaredError(name="my_mse")])
    assert model.metrics_names == ["loss", "mae", "rmse", "max_error", "batch_scalar", "my_mse"]
    history = model.fit(x, y, batch_size=5, verbose=2)
    line = capsys.readouterr().out
    assert "mae: " in line and "max_error: " in line and "my_mse: " in line
    pred = model.predict(x)
    values = history.history
    assert values["mae"][0] == pytest.approx(np.abs(pred - y).mean(), rel=1e-12)
    assert values["rmse"][0] == pytest.approx(np.sqrt(((pred - y) ** 2).mean()), rel=1e-12)
    assert values["my_mse"][0] == pytest.approx(values["loss"][0], rel=1e-12)
    assert values["max_error"][0] == pytest.approx(np.abs(y - pred).max(axis=-1).mean(),
                                                   rel=1e-12)
    assert values["batch_scalar"][0] == pytest.approx((5 + 5 + 2) / 3)   # one value a batch
    result = model.evaluate(x, y)
    assert isinstance(result, list) and len(result) == 6
    as_dict = model.evaluate(x, y, batch_size=4, return_dict=True)
    assert list(as_dict) == model.metrics_names
    assert as_dict["mae"] == pytest.approx(result[1], rel=1e-12)
    plain = fastrnn.Sequential([fastrnn.Linear(3, 2, seed=0)]).compile("mse")
    assert isinstance(plain.evaluate(x, y), float)


def test_ignored_and_padded_steps_are_not_counted():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5, 2))
    y = rng.integers(0, 3, (6, 5))
    y[:, 3:] = -100
    model = fastrnn.Sequential([fastrnn.GRU(2, 4, batch_first=True, dtype="float64", seed=0),
                                fastrnn.Linear(4, 3, dtype="float64", seed=1)])
    model.compile(fastrnn.CrossEntropyLoss(), optim.SGD(lr=0.0), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=4, verbose=0)
    pred = model.predict(x)
    kept = y != -100
    expected = (pred.argmax(-1)[kept] == y[kept]).mean()
    assert history.history["accuracy"][0] == pytest.approx(expected, rel=1e-12)
    # ragged sequences with per-step targets: only each sequence's own steps count
    xs = [x[i, :n] for i, n in enumerate([5, 2, 4, 1, 3, 5])]
    ys = [y[i, :n] % 3 for i, n in enumerate([5, 2, 4, 1, 3, 5])]
    out = model.evaluate(xs, ys, batch_size=4, return_dict=True)
    outputs = model.predict(xs)
    right = np.concatenate([o.argmax(-1) == t for o, t in zip(outputs, ys)])
    assert out["accuracy"] == pytest.approx(right.mean(), rel=1e-12)


def test_weighted_metrics_use_the_sample_weights_as_keras():
    keras = _keras()
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((10, 3)).astype(np.float32), rng.integers(0, 4, 10)
    w = rng.random(10).astype(np.float32)
    model, ref = _dense_pair(3, 4, seed=1)
    model.compile(fastrnn.CrossEntropyLoss(), optim.SGD(lr=0.0),
                  metrics=["accuracy"], weighted_metrics=[metrics.SparseCategoricalAccuracy(
                      name="weighted_accuracy")])
    ref.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=keras.optimizers.SGD(learning_rate=0.0), metrics=["accuracy"],
                weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(
                    name="weighted_accuracy")])
    ours = model.fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0).history
    theirs = ref.fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0).history
    for key in ("loss", "accuracy", "weighted_accuracy"):
        assert ours[key][0] == pytest.approx(theirs[key][0], rel=1e-5), key


@pytest.mark.parametrize("case", ["masked", "ignored", "ragged"])
def test_weighted_metrics_of_kept_steps_do_not_depend_on_the_batching(case):
    """Batches with and without masked (or ignored, or padded) steps weigh
    each sample weight per kept step alike: the value of one batch, whatever
    the size (ragged: the first three sequences share one length, so a batch
    of them has no padding)."""
    rng = np.random.default_rng(0)
    N, T, F = 6, 5, 2
    x = rng.standard_normal((N, T, F))
    w = np.arange(1.0, N + 1)
    if case == "ragged":
        lengths = [3, 3, 3, 5, 2, 4]
        x = [x[i, :n] for i, n in enumerate(lengths)]
        y = [rng.standard_normal((n, 1)) for n in lengths]
        model = fastrnn.Sequential([fastrnn.GRU(F, 3, batch_first=True, dtype="float64", seed=0),
                                    fastrnn.Linear(3, 1, dtype="float64", seed=1)])
        model.compile("mse", optim.SGD(lr=0.0), weighted_metrics=["mae"])
        err = np.zeros((N, T))
        for i, (p, t) in enumerate(zip(model.predict(x), y)):
            err[i, :len(t)] = np.abs(p - t)[:, 0]
        kept = np.arange(T)[None, :] < np.array(lengths)[:, None]
    elif case == "masked":
        x[3:, 3:] = 0.0                  # samples 3-5: the last two steps masked
        y = rng.standard_normal((N, T, 1))
        model = fastrnn.Sequential([fastrnn.Masking(0.0),
                                    fastrnn.GRU(F, 3, batch_first=True, dtype="float64", seed=0),
                                    fastrnn.Linear(3, 1, dtype="float64", seed=1)])
        model.compile("mse", optim.SGD(lr=0.0), weighted_metrics=["mae"])
        err = np.abs(model.predict(x) - y)[..., 0]
        kept = (x != 0).any(-1)
    else:
        y = rng.integers(0, 3, (N, T))
        y[4:, :2] = -100                  # ignored targets
        model = fastrnn.Sequential([fastrnn.GRU(F, 4, batch_first=True, dtype="float64",
                                                seed=0),
                                    fastrnn.Linear(4, 3, dtype="float64", seed=1)])
        model.compile(fastrnn.CrossEntropyLoss(), optim.SGD(lr=0.0),
                      weighted_metrics=["accuracy"])
        err = (model.predict(x).argmax(-1) == y).astype(float)
        kept = y != -100
    weights = np.broadcast_to(w[:, None], (N, T))
    expected = (err * weights)[kept].sum() / weights[kept].sum()
    for batch_size in (1, 2, 3, 6):
        logs = model.evaluate(x, y, sample_weight=w, batch_size=batch_size, return_dict=True)
        value = logs["accuracy" if case == "ignored" else "mae"]
        assert value == pytest.approx(expected, rel=1e-12), batch_size


def test_metric_errors():
    model = fastrnn.Sequential([fastrnn.Linear(3, 2, seed=0)])
    with pytest.raises(ValueError, match=r"Sequential.compile: unknown metric 'f1'; expected one "
                                         r"of \["):
        model.compile(metrics=["f1"])
    with pytest.raises(TypeError, match=r"Sequential.compile: a metric must be a name, a "
                                        r"fastrnn.metrics.Metric or a function .*got int"):
        model.compile(metrics=[3])
    with pytest.raises(ValueError, match=r"two metrics \(or a metric and the loss\) are named "
                                         r"'mae'"):
        model.compile(metrics=["mae", metrics.MeanAbsoluteError(name="mae")])
    with pytest.raises(ValueError, match=r"named 'loss'"):
        model.compile(metrics=[metrics.MeanSquaredError(name="loss")])
    with pytest.raises(TypeError, match=r"Sequential.compile: metrics must be a list"):
        model.compile(metrics=3.0)
    with pytest.raises(ValueError, match=r"TopKCategoricalAccuracy: k must be >= 1"):
        metrics.TopKCategoricalAccuracy(k=0)
    with pytest.raises(TypeError, match=r"BinaryAccuracy: threshold must be a number"):
        metrics.BinaryAccuracy(threshold="0.5")
    with pytest.raises(ValueError, match=r"MeanAbsoluteError: expected y_true and y_pred of the "
                                         r"same shape, got \(2, 3\) and \(2, 4\)"):
        metrics.MeanAbsoluteError().update_state(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"SparseCategoricalAccuracy: expected y_true of shape "
                                         r"\(2,\)"):
        metrics.SparseCategoricalAccuracy().update_state(np.zeros((3,)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"MeanSquaredError: sample_weight of shape \(3,\) does "
                                         r"not fit"):
        metrics.MeanSquaredError().update_state(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(3))


# --- inputs a direct call may give (a probe's findings) ----------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32, np.float16, bool])
def test_error_metrics_take_the_difference_in_a_type_that_holds_it(dtype):
    """MAE / MSE / RMSE of integer, bool or float16 arrays: the difference
    and its square were taken in the inputs' type (uint8's 3 - 5 wrapped to
    254, int8's 100 - -100 to -56, float16's 300^2 overflowed to inf;
    bools had NumPy's subtract error)."""
    if dtype is bool:
        y_true, y_pred = np.array([[True], [False]]), np.array([[False], [False]])
        expected = 0.5          # |0 - 1|, |0 - 0|
    elif dtype is np.float16:
        y_true, y_pred = np.array([[0.0]], dtype), np.array([[300.0]], dtype)
        expected = 300.0
    elif dtype is np.uint8:
        y_true, y_pred = np.array([[5]], dtype), np.array([[3]], dtype)
        expected = 2.0
    else:
        y_true, y_pred = np.array([[-100]], dtype), np.array([[100]], dtype)
        expected = 200.0
    for cls, value in ((metrics.MeanAbsoluteError, expected),
                       (metrics.MeanSquaredError, None),
                       (metrics.RootMeanSquaredError, None)):
        m = cls()
        m.update_state(y_true, y_pred)
        want = {metrics.MeanAbsoluteError: float(np.mean(np.abs(
            y_pred.astype(np.float64) - y_true.astype(np.float64)))),
            metrics.MeanSquaredError: float(np.mean((
                y_pred.astype(np.float64) - y_true.astype(np.float64)) ** 2))}
        want[metrics.RootMeanSquaredError] = want[metrics.MeanSquaredError] ** 0.5
        assert m.result() == pytest.approx(want[cls], rel=1e-6)
        if value is not None:
            assert m.result() == pytest.approx(value)


def test_rmse_of_a_negative_weighted_mean_is_nan():
    """Negative sample weights (the losses take them) can make the weighted
    mean squared error negative: RMSE gave Python's 'math domain error'
    (and so did evaluate with weighted_metrics=['rmse']); Keras gives NaN."""
    m = metrics.RootMeanSquaredError()
    m.update_state(np.array([[0.0], [0.0]]), np.array([[1.0], [2.0]]),
                   sample_weight=np.array([1.0, -0.5]))   # (1 - 2) / 0.5
    assert np.isnan(m.result())


@pytest.mark.parametrize("cls, kind", [(metrics.BinaryAccuracy, "binary"),
                                       (metrics.MeanAbsoluteError, "binary"),
                                       (metrics.SparseCategoricalAccuracy, "sparse")])
def test_sample_weight_of_shape_b_1_is_one_weight_per_sample(cls, kind):
    """A (B, 1) sample_weight for per-sample values (B,) was refused as not
    fitting them; Keras squeezes it (evaluate did take an (N, 1) one)."""
    rng = np.random.default_rng(3)
    (y_true, y_pred), _ = _batches(rng, kind)
    w = rng.random(len(y_true))
    flat, column = cls(), cls()
    flat.update_state(y_true, y_pred, sample_weight=w)
    column.update_state(y_true, y_pred, sample_weight=w[:, None])
    assert column.result() == flat.result()


def test_sparse_top_k_counts_a_target_outside_the_classes_as_a_miss():
    """As SparseCategoricalAccuracy and Keras do (TensorFlow's in_top_k): it
    raised a ValueError instead."""
    y_pred = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]],
                      np.float32)
    labels = np.array([1, -1, 3, 0])
    top = metrics.SparseTopKCategoricalAccuracy(k=2)
    top.update_state(labels, y_pred)
    plain = metrics.SparseCategoricalAccuracy()
    plain.update_state(labels, y_pred)
    assert top.result() == plain.result() == 0.5
    keras = _keras()
    ktop = keras.metrics.SparseTopKCategoricalAccuracy(k=2)
    ktop.update_state(labels, y_pred)
    assert top.result() == pytest.approx(float(ktop.result()))
