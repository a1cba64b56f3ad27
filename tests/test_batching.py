"""Data for fit / evaluate / predict: ragged sequences (padded per batch, run
with lengths: no padded step reaches the state, the loss, the gradients or the
metrics) and iterables of batches (generators, steps_per_epoch).

The oracle for ragged batches is each sequence run alone, unpadded.
"""
import re
import warnings

import numpy as np
import pytest

import fastrnn
from fastrnn import batching, optim

LENGTHS = [5, 2, 7, 1, 4, 7]


def _sequences(features=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, features)) for n in LENGTHS]


def _per_sequence_model():
    return fastrnn.Sequential([
        fastrnn.GRU(3, 4, num_layers=2, batch_first=True, dtype="float64", seed=0),
        fastrnn.Tanh(),
        fastrnn.LSTM(4, 3, bidirectional=True, dtype="float64", seed=1),   # time-major, adapted
        fastrnn.LastStep(bidirectional=True),
        fastrnn.Linear(6, 2, dtype="float64", seed=2)], seed=3)


def _per_step_model():
    return fastrnn.Sequential([
        fastrnn.LSTM(3, 4, bidirectional=True, batch_first=True, dtype="float64", seed=0),
        fastrnn.Linear(8, 5, dtype="float64", seed=1),
        fastrnn.ReLU(),
        fastrnn.RNN(5, 3, dtype="float64", seed=2),
        fastrnn.Linear(3, 2, dtype="float64", seed=3)], seed=4)


def _grads(model):
    return {f"{i}.{k}": g.copy() for i, layer in enumerate(model.layers)
            for k, g in getattr(layer, "grads", {}).items()}


def _sum_loss_grads(model, batch, loss):
    """Gradients of the summed loss over one Batch (the model's training path)."""
    model.zero_grad()
    out, backprops = model._forward_train(batch.x, batch.lengths)
    _, _, grad = loss._terms(out, batch.y, None, batch.mask)
    for backprop in reversed(backprops):
        grad = backprop(grad)
    return _grads(model)


@pytest.mark.parametrize("per_step", [False, True])
def test_ragged_batch_equals_each_sequence_alone(per_step):
    xs = _sequences()
    rng = np.random.default_rng(1)
    model = _per_step_model() if per_step else _per_sequence_model()
    ys = [rng.standard_normal((n, 2)) for n in LENGTHS] if per_step else \
        rng.standard_normal((len(LENGTHS), 2))
    loss = fastrnn.MSELoss(reduction="sum")
    data = batching.ArrayData("test", model, xs, ys)
    assert data.ragged and data.y_ragged == per_step
    batch = data.take(np.arange(len(xs)))
    assert batch.lengths.tolist() == LENGTHS and batch.x.shape == (6, 7, 3)
    assert (batch.mask is not None) == per_step
    together = _sum_loss_grads(model, batch, loss)
    alone = None
    for i, x in enumerate(xs):
        y = ys[i][None] if per_step else ys[i:i + 1]
        one = _sum_loss_grads(model, batching.Batch(x[None], y, None, None, None), loss)
        alone = one if alone is None else {k: alone[k] + v for k, v in one.items()}
    for key, value in alone.items():
        np.testing.assert_allclose(together[key], value, rtol=1e-10, atol=1e-12, err_msg=key)
    # inference: the same outputs, each sequence's own (per step: without the padding)
    outputs = model.predict(xs, batch_size=4)
    for i, x in enumerate(xs):
        expected = model.predict(x[None])[0]
        np.testing.assert_allclose(outputs[i], expected, rtol=1e-12, atol=1e-14)
    if per_step:
        assert isinstance(outputs, list) and [len(o) for o in outputs] == LENGTHS
    else:
        assert isinstance(outputs, np.ndarray) and outputs.shape == (6, 2)


def test_fit_on_ragged_sequences_and_its_loss():
    xs = _sequences()
    ys = np.random.default_rng(2).standard_normal((6, 2))
    model = _per_sequence_model()
    model.compile("mse", optim.SGD(lr=0.0), metrics=["mae"])
    history = model.fit(xs, ys, batch_size=4, verbose=0, validation_data=(xs[:3], ys[:3]))
    preds = np.concatenate([model.predict(x[None]) for x in xs])
    assert history.history["loss"][0] == pytest.approx(((preds - ys) ** 2).mean(), rel=1e-12)
    assert history.history["val_mae"][0] == pytest.approx(np.abs(preds[:3] - ys[:3]).mean(),
                                                          rel=1e-12)
    model.compile("mse", optim.Adam(lr=1e-2))
    before = model.evaluate(xs, ys)
    model.fit(xs, ys, epochs=20, batch_size=3, verbose=0)
    assert model.evaluate(xs, ys) < before
    # a list of sequences of one length is an array
    same = [np.ones((4, 3)), np.zeros((4, 3))]
    assert not batching.ArrayData("test", model, same, np.zeros((2, 2))).ragged


def test_per_step_ragged_loss_counts_only_real_steps():
    xs = _sequences()
    rng = np.random.default_rng(3)
    ys = [rng.integers(0, 2, n) for n in LENGTHS]
    model = _per_step_model()
    model.compile(fastrnn.CrossEntropyLoss(), optim.SGD(lr=0.0), metrics=["accuracy"])
    logs = model.evaluate(xs, ys, batch_size=4, return_dict=True)
    outputs = model.predict(xs)
    values = np.concatenate([fastrnn.CrossEntropyLoss(reduction="none")(o, t)
                             for o, t in zip(outputs, ys)])
    assert logs["loss"] == pytest.approx(values.mean(), rel=1e-12)
    right = np.concatenate([o.argmax(-1) == t for o, t in zip(outputs, ys)])
    assert logs["accuracy"] == pytest.approx(right.mean(), rel=1e-12)


def test_last_step_takes_each_sequences_own_last_step():
    x = np.arange(2 * 4 * 2, dtype=float).reshape(2, 4, 2)
    step = fastrnn.LastStep()
    np.testing.assert_array_equal(step._seq_infer(x, np.array([2, 4])), [x[0, 1], x[1, 3]])
    y, backprop = step._seq_train(x, np.array([1, 3]))
    np.testing.assert_array_equal(y, [x[0, 0], x[1, 2]])
    dx = backprop(np.ones((2, 2)))
    assert dx[0, 0].all() and dx[1, 2].all() and dx.sum() == 4
    both = fastrnn.LastStep(bidirectional=True)
    np.testing.assert_array_equal(both._seq_infer(x, np.array([2, 4])),
                                  [[x[0, 1, 0], x[0, 0, 1]], [x[1, 3, 0], x[1, 0, 1]]])
    with pytest.raises(ValueError, match=r"LastStep: lengths must lie in \[1, 4\]"):
        step._seq_infer(x, np.array([0, 4]))


def test_pad():
    padded, lengths = batching.pad([np.ones((3, 2)), 2 * np.ones((1, 2))])
    assert padded.shape == (2, 3, 2) and lengths.tolist() == [3, 1]
    assert padded[1, 0].tolist() == [2, 2] and not padded[1, 1:].any()
    with pytest.raises(ValueError, match=r"pad: sequences\[1\] has shape \(0, 2\); every "
                                         r"sequence needs at least one step"):
        batching.pad([np.ones((3, 2)), np.ones((0, 2))])
    with pytest.raises(ValueError, match=r"pad: sequences\[1\] has shape \(2, 3\), whose "
                                         r"trailing axes differ"):
        batching.pad([np.ones((3, 2)), np.ones((2, 3))])
    with pytest.raises(TypeError, match=r"pad: sequences must be a list of arrays"):
        batching.pad(np.ones((3, 2)))


@pytest.mark.parametrize("values, dtype, shown", [
    ([300, 1], "int8", "is 300, which dtype int8 cannot hold (it would become 44)"),
    ([-1], "uint8", "is -1, which dtype uint8 cannot hold (it would become 255)"),
    ([1.5], "int32", "is 1.5, which dtype int32 cannot hold (it would become 1)"),
    ([float("nan")], "int64", "is nan, which dtype int64 cannot hold"),
    ([2**24 + 1], "float32", "is 16777217, which dtype float32 cannot hold "
                             "(it would become 16777216.0)"),
    ([1e300], "float32", "is 1e+300, which dtype float32 cannot hold (it would become inf)"),
    ([2**53 + 1], "float64", "is 9007199254740993, which dtype float64 cannot hold "
                             "(it would become 9007199254740992.0)"),
    ([2], "bool", "is 2, which dtype bool cannot hold (it would become True)"),
])
def test_pad_refuses_a_value_its_dtype_would_change(values, dtype, shown):
    """pad(dtype=...) cast silently (as Keras' pad_sequences): int8 ids
    wrapped, a fraction truncated, an id from 2**24 on became its float32
    neighbour. [failed before: the changed values were returned]"""
    with pytest.raises(ValueError, match=r"pad: sequences\[1\]\[0\] " + re.escape(shown)):
        batching.pad([np.array([1] * len(values)), np.array(values)], dtype)


def test_pad_checks_the_common_type_as_a_given_one():
    """Without a dtype, int64 with float32 sequences (or uint64 with int64)
    met in float64 and 2**60 + 1 became 2**60 silently, where the same data
    with dtype=float64 was refused."""
    ids, features = np.array([[2**60 + 1]], np.int64), np.array([[0.5], [0.25]], np.float32)
    with pytest.raises(ValueError, match=r"pad: sequences\[0\]\[0, 0\] is 1152921504606846977, "
                                         r"which dtype float64, the sequences' common type, "
                                         r"cannot hold"):
        batching.pad([ids, features])
    with pytest.raises(ValueError, match=r"is 9007199254740993, which dtype float64"):
        batching.pad([np.array([2**53 + 1], np.uint64), np.array([1], np.int64)])
    padded, _ = batching.pad([np.array([[3]], np.int64), features])   # what float64 holds
    assert padded.dtype == np.float64 and padded[0, 0, 0] == 3


def test_pad_keeps_what_its_dtype_holds():
    """Rounding to a narrower float is what asking for it means; inf and
    NaN stay; integral floats become integers."""
    padded, _ = batching.pad([np.array([0.1, np.inf, np.nan]), np.array([1e-50])], "float32")
    assert padded.dtype == np.float32
    np.testing.assert_array_equal(padded, [[np.float32(0.1), np.inf, np.nan], [0, 0, 0]])
    padded, _ = batching.pad([np.array([3.0, -4.0]), np.array([127], np.int64)], "int8")
    assert padded.dtype == np.int8 and padded.tolist() == [[3, -4], [127, 0]]
    for dtype in ("U5", object, "nonsense"):
        with pytest.raises(TypeError, match=r"pad: dtype must be a real number or bool type"):
            batching.pad([np.ones(2)], dtype)


def test_pad_to_an_ml_dtypes_float():
    """bfloat16 (ml_dtypes) is a float type as numpy's are: rounding kept,
    overflow and rounded integers refused."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    padded, _ = batching.pad([np.array([3.0, 0.1]), np.array([256])], ml_dtypes.bfloat16)
    assert padded.dtype == ml_dtypes.bfloat16
    assert padded.astype(np.float32).tolist() == [[3.0, 0.10009765625], [256.0, 0.0]]
    for values, shown in (([1e39], r"1e\+39"), ([257], "257")):
        with pytest.raises(ValueError, match=rf"is {shown}, which dtype bfloat16 cannot hold"):
            batching.pad([np.array(values)], ml_dtypes.bfloat16)


def test_ragged_errors():
    model = _per_sequence_model().compile("mse", "sgd")
    xs = _sequences()
    with pytest.raises(ValueError, match=r"Sequential.fit: expected x as a list of sequences of "
                                         r"shape \(T_i, 3\) with T_i >= 1, got x\[1\] of shape "
                                         r"\(2, 4\)"):
        model.fit([xs[0], np.ones((2, 4))], np.ones((2, 2)), verbose=0)
    with pytest.raises(ValueError, match=r"x and y must have the same number of samples"):
        model.fit(xs, np.ones((5, 2)), verbose=0)
    step_model = _per_step_model().compile("mse", "sgd")
    with pytest.raises(ValueError, match=r"Sequential.fit: y\[1\] has shape \(3, 2\), but x\[1\] "
                                         r"has 2 steps"):
        step_model.fit(xs, [np.ones((n + (i == 1), 2)) for i, n in enumerate(LENGTHS)],
                       verbose=0)
    dense = fastrnn.Sequential([fastrnn.Linear(3, 2)]).compile("mse", "sgd")
    with pytest.raises(ValueError, match=r"x is a list of sequences of different lengths, but "
                                         r"the model has no recurrent layer"):
        dense.fit(xs, np.ones((6, 2)), verbose=0)


def test_ragged_items_are_checked_as_arrays_are():
    """A list of sequences takes its items as an array x is taken: a masked
    array refused by name (its mask was dropped and the values under it
    used), bool and complex refused, a torch tensor that requires grad
    converted. [failed before: masked and bool items ran]"""
    model = _per_sequence_model().compile("mse", "sgd")
    step_model = _per_step_model().compile("mse", "sgd")
    xs = _sequences()
    masked = [np.ma.MaskedArray(a, mask=True) for a in xs]
    for call in (lambda: model.predict(masked), lambda: model.fit(masked, np.ones((6, 2)),
                                                                  verbose=0),
                 lambda: model.evaluate(masked, np.ones((6, 2)))):
        with pytest.raises(TypeError, match=r"x\[0\] is a numpy masked array, whose mask "
                                            r"fastrnn does not read"):
            call()
    with pytest.raises(TypeError, match=r"Sequential.fit: y\[0\] is a numpy masked array"):
        step_model.fit(xs, [np.ma.MaskedArray(np.ones((n, 2)), mask=True) for n in LENGTHS],
                       verbose=0)
    with pytest.raises(TypeError, match=r"Sequential.predict: x\[0\] must have a real numeric "
                                        r"dtype, got bool"):
        model.predict([a > 0 for a in xs])
    with pytest.raises(TypeError, match=r"Sequential.evaluate: y\[1\] must have a real "
                                        r"numeric dtype, got complex128"):
        step_model.evaluate(xs, [np.ones((n, 2)) * (1 + 1j) if i == 1 else np.ones((n, 2))
                                 for i, n in enumerate(LENGTHS)])
    ml_dtypes = pytest.importorskip("ml_dtypes")
    halves = [a.astype(ml_dtypes.bfloat16) for a in xs]
    np.testing.assert_array_equal(model.predict(halves),
                                  model.predict([a.astype(np.float32) for a in halves]))
    torch = pytest.importorskip("torch")
    tensors = [torch.tensor(a, requires_grad=True) for a in xs]
    np.testing.assert_array_equal(model.predict(tensors), model.predict(xs))


# --- iterables of batches ----------------------------------------------------------------------
def _regression(n=24):
    rng = np.random.default_rng(4)
    return rng.standard_normal((n, 5, 3)), rng.standard_normal((n, 2))


def _small(seed=0):
    model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, dtype="float64", seed=seed),
                                fastrnn.LastStep(),
                                fastrnn.Linear(4, 2, dtype="float64", seed=seed + 1)],
                               seed=seed + 2)
    return model.compile("mse", optim.Adam(lr=1e-2), metrics=["mae"])


def test_iterables_train_as_the_same_batches_of_arrays():
    x, y = _regression()
    arrays = _small()
    history = arrays.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0,
                         validation_data=(x[:8], y[:8]))
    listed = _small()
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    history_list = listed.fit(batches, epochs=3, verbose=0, validation_data=[batches[0]])
    assert history.history == history_list.history
    assert all(np.array_equal(a, b) for a, b in zip(arrays.state_dict().values(),
                                                    listed.state_dict().values()))

    def generate():                        # a generator for all epochs: steps_per_epoch
        while True:
            for i in range(0, 24, 8):
                yield x[i:i + 8], y[i:i + 8]

    streamed = _small()
    history_gen = streamed.fit(generate(), epochs=3, steps_per_epoch=3, verbose=0,
                               validation_data=(x[:8], y[:8]))
    assert history_gen.history == history.history
    assert streamed.evaluate(iter(batches), return_dict=True) == \
        arrays.evaluate(x, y, batch_size=8, return_dict=True)
    np.testing.assert_array_equal(streamed.predict(b[0] for b in batches), arrays.predict(x))
    np.testing.assert_array_equal(streamed.predict(iter(batches), steps=1), arrays.predict(x[:8]))


def test_predict_takes_x_from_list_batches_as_a_torch_dataloader_yields_them():
    x, y = _regression()
    model = _small()
    lists = [[x[i:i + 8], y[i:i + 8]] for i in range(0, 24, 8)]
    np.testing.assert_array_equal(model.predict(iter(lists)), model.predict(x))
    weighted = [[x[i:i + 8], y[i:i + 8], np.ones(8)] for i in range(0, 24, 8)]
    np.testing.assert_array_equal(model.predict(iter(weighted)), model.predict(x))
    # ids: x (B, T) and y (B, T) are both 2-D, more than an id sequence's one
    ids = np.random.default_rng(2).integers(0, 5, (6, 4))
    embedded = fastrnn.Sequential([fastrnn.Embedding(5, 3, seed=0),
                                   fastrnn.GRU(3, 2, batch_first=True, seed=1)])
    np.testing.assert_array_equal(embedded.predict(iter([[ids, ids]])), embedded.predict(ids))
    # a batch of two (or three) sequences of different lengths stays a list of sequences
    xs = _sequences()
    ragged = _per_sequence_model()
    for pair in ([xs[0], xs[1]], [xs[0], xs[1], xs[2]]):
        np.testing.assert_array_equal(ragged.predict(iter([pair])), ragged.predict(pair))


def test_a_generator_that_runs_out_stops_training_with_a_warning():
    x, y = _regression()
    model = _small()

    def once():
        for i in range(0, 24, 8):
            yield x[i:i + 8], y[i:i + 8], np.ones(8)

    with pytest.warns(UserWarning, match=r"Sequential.fit: x ran out of batches; training "
                                         r"stops"):
        history = model.fit(once(), epochs=3, verbose=0)
    assert history.epoch == [0]
    with pytest.warns(UserWarning, match="ran out"):
        history = model.fit(once(), epochs=3, steps_per_epoch=2, verbose=0)
    assert history.epoch == [0, 1]            # the second epoch got one batch of two
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a list starts over: steps_per_epoch continues through it, round and round
        history = model.fit([(x[:8], y[:8]), (x[8:16], y[8:16])], epochs=3, steps_per_epoch=3,
                            verbose=0)
    assert history.epoch == [0, 1, 2]


@pytest.mark.parametrize("shuffle", [False, True])
def test_steps_per_epoch_continues_through_the_arrays(shuffle):
    """Keras' rule: with arrays, an epoch of steps_per_epoch batches takes the
    next batches of the current pass (one permutation a pass when shuffled);
    an epoch at the pass's end stops there with a warning, and the next
    starts a new pass. Each row is seen once a pass."""
    N, batch_size = 40, 8                    # 5 batches a pass, 2 an epoch
    x = np.arange(N, dtype=np.float32).reshape(N, 1)
    model = fastrnn.Sequential([fastrnn.Linear(1, 1, seed=0)], seed=0)
    seen, ends = [], []
    model.compile("mse", optim.SGD(lr=0.0), metrics=[
        fastrnn.metrics.MeanMetricWrapper(lambda y, p: seen.extend(y[:, 0]) or y, "rows")])
    at_epoch_end = fastrnn.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(len(seen)))
    with pytest.warns(UserWarning, match=r"Sequential.fit: the samples ran out before "
                                         r"steps_per_epoch=2 batches") as caught:
        history = model.fit(x, x, epochs=6, batch_size=batch_size, steps_per_epoch=2,
                            shuffle=shuffle, verbose=0, callbacks=[at_epoch_end])
    assert len(caught) == 2                  # epochs 2 and 5
    assert history.epoch == list(range(6))
    assert np.diff([0] + ends).tolist() == [16, 16, 8, 16, 16, 8]
    rows = np.array(seen).astype(int)
    first_pass, second_pass = rows[:N], rows[N:]
    assert sorted(first_pass) == list(range(N)) and sorted(second_pass) == list(range(N))
    if not shuffle:
        assert list(first_pass) == list(range(N))
    else:
        assert list(first_pass) != list(second_pass)


def test_ragged_batches_from_an_iterable():
    xs = _sequences()
    ys = np.random.default_rng(5).standard_normal((6, 2))
    model = _per_sequence_model().compile("mse", optim.SGD(lr=0.0))
    history = model.fit([(xs[:4], ys[:4]), (xs[4:], ys[4:])], verbose=0)
    preds = np.concatenate([model.predict(x[None]) for x in xs])
    assert history.history["loss"][0] == pytest.approx(((preds - ys) ** 2).mean(), rel=1e-12)


def test_iterable_errors():
    x, y = _regression()
    model = _small()
    with pytest.raises(TypeError, match=r"Sequential.fit: each batch of x must be a tuple "
                                        r"\(x, y\) or \(x, y, sample_weight\), got an array of "
                                        r"shape \(5, 3\) in batch 0"):
        model.fit(iter(x), verbose=0)
    with pytest.raises(ValueError, match=r"Sequential.fit: batch_size does not apply to x as an "
                                         r"iterable"):
        model.fit([(x, y)], batch_size=4, verbose=0)
    for method, args in ((model.evaluate, ([(x, y)],)), (model.predict, ([(x, y)],))):
        with pytest.raises(ValueError, match=rf"Sequential.{method.__name__}: batch_size does "
                                             rf"not apply to x as an iterable"):
            method(*args, batch_size=4)
    with pytest.raises(TypeError, match="clip_grad_norm: params must be fastrnn modules"):
        optim.clip_grad_norm("x", 1.0)
    with pytest.raises(ValueError, match=r"Sequential.fit: validation_split needs arrays"):
        model.fit([(x, y)], validation_split=0.5, verbose=0)
    with pytest.raises(TypeError, match=r"Sequential.fit: y is missing"):
        model.fit(x, verbose=0)
    with pytest.raises(ValueError, match=r"Sequential.fit: expected x of x batch 0 of shape"):
        model.fit([(x[:, :, :2], y)], verbose=0)
    with pytest.raises(TypeError, match=r"validation_data must be a pair \(x_val, y_val\), a "
                                        r"triple .* or an iterable of batches"):
        model.fit(x, y, validation_data=3, verbose=0)
    with pytest.raises(ValueError, match=r"Sequential.evaluate: the data gave no batches"):
        model.evaluate(iter([]))
    with pytest.raises(ValueError, match=r"Sequential.predict: steps applies only to x as an "
                                         r"iterable"):
        model.predict(x, steps=2)


def test_fit_shuffles_as_the_generator_permutes_in_half_the_memory():
    """The pass's order is rng.permutation's (the same trained weights as
    before), held in int32."""
    from fastrnn.model import _permutation
    for n in (1, 7, 1000, 100_003):
        order = _permutation(np.random.default_rng(n), n)
        assert order.dtype == np.int32
        np.testing.assert_array_equal(order, np.random.default_rng(n).permutation(n))


# --- a probe's findings: padded per-step targets, validation iterables, ids, batches --------

def test_per_step_targets_padded_into_one_array_leave_their_padding_out():
    """Ragged x with its per-step targets padded into one array (pad's
    result): they were read as one target per sequence, so the padded zeros
    counted in the loss (evaluate 0.834 instead of 1.301) and were trained
    on, silently (or, in batches, a shape error). They are now each
    sequence's own steps, as the list of them is."""
    xs = _sequences(seed=5)
    rng = np.random.default_rng(6)
    ys = [rng.standard_normal((len(x), 2)) for x in xs]
    padded, _ = batching.pad(ys)
    model = _per_step_model().compile(loss="mse", optimizer="sgd")
    listed = model.evaluate(xs, ys)
    for batch_size in (None, 2):
        assert model.evaluate(xs, padded, batch_size=batch_size) == listed
    # the oracle: each sequence alone
    errors = [(model.predict(x[None])[0] - y) ** 2 for x, y in zip(xs, ys)]
    assert listed == pytest.approx(np.concatenate(errors).mean(), rel=1e-12)
    twin = _per_step_model().compile(loss="mse", optimizer="sgd")
    a = model.fit(xs, padded, epochs=2, batch_size=4, shuffle=False, verbose=0)
    b = twin.fit(xs, ys, epochs=2, batch_size=4, shuffle=False, verbose=0)
    assert a.history["loss"] == b.history["loss"]
    with pytest.raises(ValueError, match=r"y of shape \(6, 8, 2\) holds per-step targets .* "
                                         r"padded to 8 steps, but the longest sequence of x "
                                         r"has 7"):
        model.evaluate(xs, np.zeros((6, 8, 2)))
    # a model with one output per sequence takes one target per sequence
    per_sequence = _per_sequence_model().compile(loss="mse", optimizer="sgd")
    per_sequence.evaluate(xs, np.zeros((6, 2)))


def test_each_validation_of_an_iterable_that_starts_over_takes_its_first_batches():
    """validation_steps over a list of batches went on where the last epoch's
    validation stopped (batches 0-1, then 2-3, then 4 and 0): val_loss came
    from other samples each epoch. Keras starts each validation over."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 3, 3)), rng.standard_normal((10, 2))
    batches = [(x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]) for i in range(5)]
    seen = []   # the first value of each validation batch
    model = _per_sequence_model().compile(loss="mse", optimizer="sgd")
    original = model._run

    def run(x, *args, **kwargs):
        if not kwargs.get("train", True):
            seen.append(float(x[0, 0, 0]))
        return original(x, *args, **kwargs)

    model._run = run
    model.fit(x, y, epochs=3, validation_data=batches, validation_steps=2, verbose=0)
    assert seen == [x[0, 0, 0], x[2, 0, 0]] * 3


def test_a_generator_as_validation_data_is_refused_or_stops_training_when_it_runs_out():
    """A generator runs once. Without validation_steps the second epoch's
    validation found nothing and raised after that epoch had trained (fit
    gave no History): now refused before training. With validation_steps,
    a validation that ran short was silent: now a warning, and training
    stops after that epoch, its History kept."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 3, 3)), rng.standard_normal((10, 2))

    def gen(n):
        for i in range(n):
            yield x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]

    model = _per_sequence_model().compile(loss="mse", optimizer="sgd")
    before = model.state_dict()
    with pytest.raises(ValueError, match="validation_data is a generator .* only the first "
                                         "of the 3 epochs could validate"):
        model.fit(x, y, epochs=3, validation_data=gen(5), verbose=0)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    model.fit(x, y, epochs=1, validation_data=gen(5), verbose=0)   # one epoch: fine
    with pytest.warns(UserWarning, match=r"validation_data ran out of batches \(1 of "
                                         r"validation_steps=2 this epoch\); training stops"):
        history = model.fit(x, y, epochs=5, validation_data=gen(5), validation_steps=2,
                            verbose=0)
    assert len(history.history["val_loss"]) == 3
    # exactly used up: the look-ahead tells at the epoch that took the last batch
    with pytest.warns(UserWarning, match="validation_data ran out of batches"):
        history = model.fit(x, y, epochs=5, validation_data=gen(4), validation_steps=2,
                            verbose=0)
    assert len(history.history["val_loss"]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = model.fit(x, y, epochs=2, validation_data=gen(4), validation_steps=2,
                            verbose=0)
    assert len(history.history["val_loss"]) == 2
    with pytest.warns(UserWarning, match=r"x ran out of batches after 2 of steps=5"):
        model.evaluate(gen(2), steps=5)


def test_ragged_ids_are_padded_as_integers():
    """A float32 model's ragged id sequences were padded in float32: an id
    from 2**24 on became its neighbour (2**24 + 1 -> 2**24), another
    embedding row."""
    big = 2 ** 24 + 1
    model = fastrnn.Sequential([fastrnn.Embedding(big + 1, 3, seed=0),
                                fastrnn.GRU(3, 2, batch_first=True, seed=1),
                                fastrnn.LastStep()], seed=2)
    ids = [np.array([big, 5]), np.array([7])]
    ragged = model.predict(ids)
    alone = model.predict(np.array([[big, 5]]))
    assert np.array_equal(ragged[0], alone[0])


def test_an_iterables_bad_batch_is_named():
    """A batch of no samples, or a later batch whose targets do not fit the
    output: the messages named no batch (the loss's own message)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3, 3)), rng.standard_normal((6, 2))
    model = _per_sequence_model().compile(loss="mse", optimizer="sgd")
    with pytest.raises(ValueError, match="x of x batch 1 has no samples"):
        model.fit(iter([(x[:2], y[:2]), (x[:0], y[:0])]), verbose=0)
    with pytest.raises(ValueError, match=r"Sequential.fit: in batch 1 of x: MSELoss: pred and "
                                         r"target must have the same shape"):
        model.fit(iter([(x[:2], y[:2]), (x[2:4], y[2:4, 0])]), verbose=0)
    with pytest.raises(ValueError, match=r"Sequential.evaluate: in batch 1 of x: MSELoss"):
        model.evaluate(iter([(x[:2], y[:2]), (x[2:4], y[2:4, 0])]))


def test_a_generator_gives_up_only_the_batches_used():
    """The look-ahead that tells fit a validation generator ran out draws
    the next batch only when another epoch will take it: evaluate(steps=k)
    had drawn k + 1 (the extra one lost to the next call), and fit's last
    validation one more than it used (a generator fed from a queue would
    wait on it)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 3, 3)), rng.standard_normal((12, 2))
    drawn = []

    def gen(n):
        for i in range(n):
            drawn.append(i)
            yield x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]

    model = _per_sequence_model().compile(loss="mse", optimizer="sgd")
    batches = gen(6)
    model.evaluate(batches, steps=2)
    assert drawn == [0, 1]
    model.evaluate(batches, steps=2)
    assert drawn == [0, 1, 2, 3]
    drawn.clear()
    model.fit(x, y, epochs=2, validation_data=gen(6), validation_steps=2, verbose=0)
    assert drawn == [0, 1, 2, 3]


def test_a_value_error_subclass_of_a_batch_keeps_its_type():
    """Naming the batch of an iterable's error must not turn a ValueError
    subclass into a plain ValueError (an except of the subclass missed it):
    the batch goes into a note instead."""
    class DataProblem(ValueError):
        pass

    class Picky(fastrnn.MSELoss):
        def _terms(self, *args, **kwargs):
            raise DataProblem("custom")

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3, 3)), rng.standard_normal((4, 2))
    model = _per_sequence_model().compile(loss=Picky(), optimizer="sgd")
    with pytest.raises(DataProblem, match="custom") as caught:
        model.evaluate(iter([(x, y)]))
    assert "Sequential.evaluate: in batch 0 of x" in caught.value.__notes__
