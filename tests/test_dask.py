"""Batch scoring on a real distributed.LocalCluster of worker processes
(skipped without dask/distributed)."""
import numpy as np
import pytest

import fastrnn

da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")
import fastrnn.dask as fdask  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            yield c


def seed_model():
    return fastrnn.Sequential([fastrnn.GRU(2, 8, batch_first=True, seed=0),
                               fastrnn.LastStep(), fastrnn.Linear(8, 1, seed=1)])


def test_predict_on_a_cluster_equals_local_predict(client):
    model = seed_model()
    x = np.random.default_rng(0).standard_normal((230, 12, 2)).astype(np.float32)
    scores = fdask.predict(model, da.from_array(x, chunks=(50, 12, 2)))
    assert scores.chunks[0] == (50, 50, 50, 50, 30)
    got = scores.compute()
    np.testing.assert_array_equal(got, model.predict(x))   # a row's bits whatever its block
    workers = client.run(lambda: 1)
    assert len(workers) == 2                              # the work went to processes


def test_predict_a_layer_and_a_dataframe(client):
    layer = fastrnn.LSTM(2, 4, batch_first=True, seed=3)
    x = np.random.default_rng(1).standard_normal((40, 5, 2)).astype(np.float32)
    got = fdask.predict(layer, da.from_array(x, chunks=(16, 5, 2))).compute()
    np.testing.assert_array_equal(got, layer(x)[0])
    import pandas as pd
    model = seed_model()
    frame = pd.DataFrame(x.reshape(40, 10), columns=[f"c{i}" for i in range(10)])
    scores = fdask.predict_dataframe(model, dd.from_pandas(frame, npartitions=3), steps=5,
                                     features=2).compute()
    assert list(scores.columns) == ["out_0"] and (scores.index == frame.index).all()
    np.testing.assert_array_equal(scores["out_0"].to_numpy(), model.predict(x)[:, 0])


def test_bad_arguments():
    model = seed_model()
    with pytest.raises(TypeError, match="x must be a dask array"):
        fdask.predict(model, np.zeros((2, 3, 2)))
    with pytest.raises(TypeError, match="model must be a fastrnn Sequential"):
        fdask.predict(fastrnn.Linear(2, 1), da.zeros((2, 3, 2)))
    x = da.zeros((4, 3, 2), chunks=2)   # refused when the graph is made, not per block
    with pytest.raises(TypeError, match="fastrnn.dask.predict: x is a masked dask array"):
        fdask.predict(model, da.ma.masked_array(x, mask=x > 0))
    with pytest.raises(ValueError, match="expected 5 x 2 = 10 columns, got 3"):
        import pandas as pd
        fdask.predict_dataframe(model, dd.from_pandas(pd.DataFrame(np.zeros((4, 3))),
                                                      npartitions=1), steps=5, features=2)


@pytest.mark.parametrize("kind", ["sequential", "layer"])
def test_the_graph_scores_with_the_weights_of_when_predict_was_called(kind):
    """[failed before] On a local scheduler each block read the live model:
    weights loaded between predict and compute (or during it, from another
    thread) scored some blocks with the old set and some with the new."""
    import dask
    model = seed_model() if kind == "sequential" else fastrnn.GRU(2, 8, batch_first=True,
                                                                  seed=0)
    x = np.random.default_rng(2).standard_normal((60, 12, 2)).astype(np.float32)
    before = model.predict(x) if kind == "sequential" else model(x)[0]
    scores = fdask.predict(model, da.from_array(x, chunks=(20, 12, 2)))
    model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(scores.compute(), before)


def test_a_float64_model_scores_a_dataframe_in_float64():
    """[failed before] predict_dataframe cast every partition to float32,
    rounding a float64 model's input (5e-9 off its predict)."""
    import pandas as pd
    model = fastrnn.Sequential([fastrnn.GRU(2, 8, batch_first=True, dtype="float64", seed=0),
                                fastrnn.LastStep(),
                                fastrnn.Linear(8, 1, dtype="float64", seed=1)])
    x = np.random.default_rng(3).standard_normal((30, 5, 2))
    frame = pd.DataFrame(x.reshape(30, 10))
    scores = fdask.predict_dataframe(model, dd.from_pandas(frame, npartitions=2), steps=5,
                                     features=2).compute()
    # float64 to its rounding (its products run through BLAS: a partition's
    # rows round as a batch of their number), not float32's
    np.testing.assert_allclose(scores["out_0"].to_numpy(), model.predict(x)[:, 0], rtol=0,
                               atol=1e-14)


def test_empty_blocks_and_partitions_score_to_no_rows():
    """[failed before] A block or partition with no rows (a filtered array's
    chunks of unknown size) raised "Sequential: got no samples"."""
    import dask
    import pandas as pd
    model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, seed=0),
                                fastrnn.Linear(4, 2, seed=1)])
    x = np.random.default_rng(4).standard_normal((12, 5, 3)).astype(np.float32)
    x[4:8, 0, 0] = -5                                   # the second block of 4 filtered out
    keep = x[:, 0, 0] > -1
    dx = da.from_array(x, chunks=(4, 5, 3))
    with dask.config.set(scheduler="sync"):
        got = fdask.predict(model, dx[dx[:, 0, 0] > -1]).compute()
        np.testing.assert_array_equal(got, model.predict(x[keep]))
        for kind in (fastrnn.GRU(3, 4, seed=0), model):   # all rows filtered out
            none = fdask.predict(kind, dx[dx[:, 0, 0] > 100]).compute()
            assert none.shape == (0, 5, 4 if kind is not model else 2)
            assert none.dtype == np.float32
        frame = dd.from_pandas(pd.DataFrame(x.reshape(12, 15)), npartitions=3)
        kept = frame.map_partitions(lambda part: part[part[0] > -1])   # partition 2 empty
        scores = fdask.predict_dataframe(model, kept, steps=5, features=3).compute()
    np.testing.assert_array_equal(scores.to_numpy(), model.predict(x[keep]).reshape(-1, 10))
    assert list(scores.index) == list(np.flatnonzero(keep))


def test_the_scores_are_chunked_like_x_empty_chunks_too():
    """[failed before] dask's concatenate dropped an empty chunk between
    others: x chunked (30, 0, 40, 30) gave scores chunked (30, 40, 30), not
    like x as the docstring says."""
    model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, seed=0),
                                fastrnn.LastStep()])
    x = np.random.default_rng(5).standard_normal((100, 7, 3)).astype(np.float32)
    for chunks in ((30, 0, 40, 30), (0, 100), (100, 0), (50, 50)):
        scores = fdask.predict(model, da.from_array(x, chunks=(chunks, 7, 3)))
        assert scores.chunks[0] == chunks
        np.testing.assert_array_equal(scores.compute(scheduler="sync"), model.predict(x))


def test_a_model_holding_a_stateful_is_refused():
    """[failed before] The one-row trial call fixed the Stateful's batch size
    to 1 (or failed with batch_size=4): every block failed, blaming the batch
    size. Blocks run in any order, so no state can carry across them."""
    import pandas as pd
    gru = fastrnn.GRU(3, 4, batch_first=True, seed=0)
    deep = fastrnn.Reversed(fastrnn.GRU(3, 4, batch_first=True, seed=0))
    # (a wrapper's layer set anew is checked as the constructor checks it)
    with pytest.raises(TypeError, match="Reversed: layer must not hold a Stateful"):
        deep.layer = fastrnn.Stateful(gru)
    object.__setattr__(deep, "layer", fastrnn.Stateful(gru))   # (made all the same)
    x = da.zeros((8, 5, 3), chunks=(4, 5, 3), dtype=np.float32)
    frame = dd.from_pandas(pd.DataFrame(np.zeros((8, 15))), npartitions=2)
    for stateful in (fastrnn.Stateful(gru), fastrnn.Stateful(gru, batch_size=4), deep):
        model = fastrnn.Sequential([stateful, fastrnn.Linear(4, 1, seed=1)])
        with pytest.raises(ValueError, match=r"fastrnn.dask.predict: model.layers\[0\] "
                                             r"\((Stateful|Reversed)\(.*\) is or wraps a "
                                             r"Stateful, which carries its state from one batch "
                                             r"to the next; the blocks are scored in any order"):
            fdask.predict(model, x, batch_size=4)
        with pytest.raises(ValueError, match=r"predict_dataframe: model.layers\[0\] .* is or "
                                             r"wraps a Stateful"):
            fdask.predict_dataframe(model, frame, steps=5, features=3)
    with pytest.raises(TypeError, match="model must be a fastrnn Sequential or RNN/GRU/LSTM "
                                        "layer, got Stateful"):
        fdask.predict(fastrnn.Stateful(gru), x)


def test_shape_errors_name_the_users_x():
    """[failed before] The messages showed the one-row trial call's shape,
    (1, 3), not the user's (5, 3); a layer took each 2-D block for one
    unbatched sequence and scored it silently."""
    model = seed_model()                                 # GRU(2, ...)
    for bad in ((5, 3), (5, 3, 4)):
        with pytest.raises(ValueError, match=rf"fastrnn.dask.predict: expected x of shape "
                                             rf"\(N, T, 2\) \(batch-first sequences: samples, "
                                             rf"steps, features\), got \({bad[0]}, {bad[1]}"):
            fdask.predict(model, da.zeros(bad))
    with pytest.raises(ValueError, match=r"expected x of shape \(N, T, 2\) .*, got \(5, 2\)"):
        fdask.predict(fastrnn.GRU(2, 4, batch_first=True), da.zeros((5, 2), chunks=2))
    # no steps: the trial call's (1, 0, 2) was named
    with pytest.raises(ValueError, match=r"fastrnn.dask.predict: x of shape \(10, 0, 2\) has "
                                         r"no steps; expected at least one"):
        fdask.predict(model, da.zeros((10, 0, 2), chunks=5))
    with pytest.raises(TypeError, match=r"fastrnn.dask.predict: batch_size must be an int, "
                                        r"got float"):
        fdask.predict(fastrnn.GRU(2, 4), da.zeros((5, 3, 2)), batch_size=2.0)


def test_predict_dataframe_checks_its_arguments():
    """[failed before] A pandas DataFrame, steps or features of the wrong type
    or sign, or a column of strings gave pandas', numpy's or Python's own
    errors (AttributeError, "negative dimensions are not allowed", ...)."""
    import pandas as pd
    model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, seed=0), fastrnn.LastStep()])
    values = pd.DataFrame(np.zeros((6, 15)))
    frame = dd.from_pandas(values, npartitions=2)
    owner = "fastrnn.dask.predict_dataframe: "
    with pytest.raises(TypeError, match=owner + r"df must be a dask DataFrame, got DataFrame "
                                                r"\(for a pandas one, pass "
                                                r"dask.dataframe.from_pandas"):
        fdask.predict_dataframe(model, values, steps=5, features=3)
    with pytest.raises(TypeError, match=owner + "steps must be an int, got float"):
        fdask.predict_dataframe(model, frame, steps=5.0, features=3)
    with pytest.raises(ValueError, match=owner + "features must be >= 1, got -3"):
        fdask.predict_dataframe(model, frame, steps=5, features=-3)
    with pytest.raises(ValueError, match=owner + "features must be the model's input size, 3, "
                                                 "got 5"):
        fdask.predict_dataframe(model, frame, steps=3, features=5)
    strings = values.copy()
    strings[3] = "a"
    with pytest.raises(TypeError, match=owner + r"df's columns must be numeric \(int or "
                                                r"float\), got column 3 of dtype"):
        fdask.predict_dataframe(model, dd.from_pandas(strings, npartitions=2), steps=5,
                                features=3)
    # features left out: the model's input size
    scores = fdask.predict_dataframe(model, frame, steps=5).compute(scheduler="sync")
    np.testing.assert_array_equal(scores.to_numpy(), model.predict(np.zeros((6, 5, 3))))


def test_an_ids_model_scores_a_dataframe_of_ids():
    """[failed before] A model starting with an Embedding could not be scored:
    every row was reshaped to (steps, features), never to the (steps,) ids
    the Embedding takes."""
    import pandas as pd
    model = fastrnn.Sequential([fastrnn.Embedding(7, 3, mask_zero=True, seed=0),
                                fastrnn.GRU(3, 4, batch_first=True, seed=1), fastrnn.LastStep()])
    ids = np.random.default_rng(5).integers(0, 7, (10, 5))
    frame = dd.from_pandas(pd.DataFrame(ids), npartitions=3)
    for features in (None, 1):
        scores = fdask.predict_dataframe(model, frame, steps=5, features=features)
        np.testing.assert_array_equal(scores.compute(scheduler="sync").to_numpy(),
                                      model.predict(ids))
    with pytest.raises(ValueError, match=r"predict_dataframe: the model starts with an "
                                         r"Embedding, so a row holds one id per step: features "
                                         r"must be 1 \(or omitted\), got 3"):
        fdask.predict_dataframe(model, frame, steps=5, features=3)


def test_nullable_id_columns_score_as_their_integers():
    """pandas' nullable Int64 columns of ids (no value missing) score as
    int64 ones [failed before: their object array was refused at compute
    time as Sequential.predict's x]; a missing id is refused by name."""
    import pandas as pd
    model = fastrnn.Sequential([fastrnn.Embedding(7, 3, seed=0),
                                fastrnn.GRU(3, 4, batch_first=True, seed=1), fastrnn.LastStep()])
    ids = pd.DataFrame(np.random.default_rng(6).integers(0, 7, (10, 5)))
    nullable = ids.astype("Int64")
    scores = fdask.predict_dataframe(model, dd.from_pandas(nullable, npartitions=3), steps=5)
    np.testing.assert_array_equal(scores.compute(scheduler="sync").to_numpy(),
                                  model.predict(ids.to_numpy()))
    for other in (ids.astype("Float64"), ids.astype("UInt64"),
                  ids.astype({0: "Int64", 1: "float64"})):
        scores = fdask.predict_dataframe(model, dd.from_pandas(other, npartitions=3), steps=5)
        np.testing.assert_array_equal(scores.compute(scheduler="sync").to_numpy(),
                                      model.predict(ids.to_numpy()))
    nullable.iloc[4, 2] = pd.NA
    scores = fdask.predict_dataframe(model, dd.from_pandas(nullable, npartitions=3), steps=5)
    with pytest.raises(ValueError, match=r"predict_dataframe: df holds missing values "
                                         r"\(pandas.NA\); fill or drop them first"):
        scores.compute(scheduler="sync")
    # a float model's nullable features likewise (pandas made them NaN); NaN itself is a value
    floats = fastrnn.Sequential([fastrnn.GRU(1, 4, batch_first=True, seed=1), fastrnn.LastStep()])
    scores = fdask.predict_dataframe(floats, dd.from_pandas(nullable.astype("Float64"),
                                                            npartitions=3), steps=5)
    with pytest.raises(ValueError, match=r"df holds missing values \(pandas.NA\)"):
        scores.compute(scheduler="sync")
    with_nan = ids.astype(np.float64)
    with_nan.iloc[4, 2] = np.nan
    scores = fdask.predict_dataframe(floats, dd.from_pandas(with_nan, npartitions=3), steps=5)
    assert np.isnan(scores.compute(scheduler="sync").to_numpy()[4]).all()


def test_predict_dataframe_result_carries_dfs_index_before_compute(tmp_path):
    """The lazy result's metadata had a default (unnamed int64) index
    whatever df's was, and to_parquet of a named index failed
    ("None of ['__null_dask_index__'] are in the columns")."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    model = seed_model()
    values = np.random.default_rng(0).standard_normal((6, 10))
    index = pd.date_range("2026-01-01", periods=6, freq="h", name="when")
    frame = dd.from_pandas(pd.DataFrame(values, index=index), npartitions=2)
    scores = fdask.predict_dataframe(model, frame, steps=5)
    assert scores.index.name == "when" and scores.index.dtype == index.dtype
    scores.to_parquet(tmp_path / "scores")
    back = pd.read_parquet(tmp_path / "scores")
    assert back.index.name == "when"
    np.testing.assert_array_equal(back.to_numpy(), scores.compute().to_numpy())


def test_predict_names_unknown_chunk_sizes_past_the_samples_axis():
    """Unknown (NaN) chunk sizes along the steps or features failed inside
    dask's rechunk, naming neither x nor the way out."""
    dask = pytest.importorskip("dask")
    x = np.zeros((6, 5, 2), np.float32)
    for shape, axis in (((6, np.nan, 2), 1), ((6, 5, np.nan), 2)):
        lazy = da.from_delayed(dask.delayed(x), shape=shape, dtype=np.float32)
        with pytest.raises(ValueError, match=rf"x's chunk sizes along axis {axis} are unknown "
                                             rf"\(NaN\); call x.compute_chunk_sizes\(\) first"):
            fdask.predict(seed_model(), lazy)
