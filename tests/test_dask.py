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
