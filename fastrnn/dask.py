"""Batch scoring on Dask (dask is optional: ``pip install "dask[array,distributed]"``).

``predict(model, x)`` scores a Dask array of sequences block by block on
whatever scheduler is active: threads, processes, or a ``distributed``
cluster. The model is one task of the graph that every block's task depends
on, so a cluster ships it to each worker once, not once per block; blocks
are scored with the inference path, the results equal to ``model.predict``
on the whole array. The model in the graph is a copy taken when ``predict``
is called: every block is scored with those weights, even if the model is
trained or loaded meanwhile (a local scheduler's blocks read the live model,
some before a load and some after). To use a real cluster, connect a client
first::

    from dask.distributed import Client
    client = Client("tcp://scheduler-address:8786")
    scores = fastrnn.dask.predict(model, sequences).compute()
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from fastrnn.layers import GRU, LSTM, RNN, _RNNBase
from fastrnn.model import Sequential


def _require_dask():
    try:
        import dask
        import dask.array as da
    except ImportError:
        raise ImportError("fastrnn.dask needs dask: pip install \"dask[array]\"") from None
    return dask, da


def _check_model(model, owner):
    if not isinstance(model, (Sequential, _RNNBase)):
        raise TypeError(f"{owner}: model must be a fastrnn Sequential or RNN/GRU/LSTM layer, "
                        f"got {type(model).__name__}")


def _snapshot(model):
    """The model as it is now, in one piece (a Sequential's layers of one
    moment: see Sequential.__getstate__), for the graph."""
    return copy.deepcopy(model)


def _input_dtype(model):
    dtype = model._dtype() if isinstance(model, Sequential) else model.dtype
    return np.float32 if dtype is None else dtype


def _score(model, block, batch_size):
    if isinstance(model, Sequential):
        return model.predict(block, batch_size=batch_size)
    return model._seq_infer(block)   # batch-first sequences in and out, as Sequential's


def predict(model: Sequential | RNN | GRU | LSTM, x: Any, batch_size: int | None = None) -> Any:
    """Score a Dask array of batch-first sequences, (N, T, features).

    Parameters
    ----------
    model : Sequential, or an RNN/GRU/LSTM layer (its output sequence)
    x : dask.array.Array of shape (N, T, features); chunked along N as you
        like (each chunk is one task), whole along the other axes (rechunked
        if not)
    batch_size : int, optional; the batch size of ``Sequential.predict``
        inside a block

    Returns
    -------
    dask.array.Array, chunked like x along N: compute it (or persist it).
    """
    dask, da = _require_dask()
    _check_model(model, "fastrnn.dask.predict")
    if not isinstance(x, da.Array):
        raise TypeError(f"fastrnn.dask.predict: x must be a dask array, got {type(x).__name__}"
                        f" (for a numpy array, call model.predict)")
    if x.ndim < 2:
        raise ValueError(f"fastrnn.dask.predict: expected sequences of shape (N, T, features), "
                         f"got shape {x.shape}")
    x = x.rechunk({axis: -1 for axis in range(1, x.ndim)})
    # the shape and dtype of one sample's output, from a zero sample
    model = _snapshot(model)
    probe = np.asarray(_score(model, np.zeros((1,) + x.shape[1:], x.dtype), batch_size))
    shared_model = dask.delayed(model, pure=True)
    blocks = []
    for block, rows in zip(x.to_delayed().ravel(), x.chunks[0]):
        scored = dask.delayed(_score, pure=True)(shared_model, block, batch_size)
        blocks.append(da.from_delayed(scored, shape=(rows,) + probe.shape[1:], dtype=probe.dtype))
    return da.concatenate(blocks, axis=0)


def predict_dataframe(model: Sequential | RNN | GRU | LSTM, df: Any, steps: int,
                      features: int, batch_size: int | None = None) -> Any:
    """Score a Dask dataframe whose rows are flattened sequences: each row's
    ``steps * features`` numeric columns, step-major (all features of step 0,
    then of step 1, ...). Returns a Dask dataframe of the outputs, one row per
    input row (same index), columns ``out_0``, ``out_1``, ...
    """
    dask, _ = _require_dask()
    import pandas as pd
    _check_model(model, "fastrnn.dask.predict_dataframe")
    if len(df.columns) != steps * features:
        raise ValueError(f"fastrnn.dask.predict_dataframe: expected {steps} x {features} = "
                         f"{steps * features} columns, got {len(df.columns)}")
    model = _snapshot(model)
    dtype = _input_dtype(model)   # (float32 always had rounded a float64 model's input)
    probe = np.asarray(_score(model, np.zeros((1, steps, features), dtype), batch_size))
    width = int(np.prod(probe.shape[1:]))
    columns = [f"out_{i}" for i in range(width)]
    shared_model = dask.delayed(model, pure=True)

    def score_partition(part, model):
        values = part.to_numpy(dtype=dtype).reshape(len(part), steps, features)
        out = np.asarray(_score(model, values, batch_size)).reshape(len(part), width)
        return pd.DataFrame(out, index=part.index, columns=columns)

    meta = pd.DataFrame({c: pd.Series(dtype=probe.dtype) for c in columns})
    return df.map_partitions(score_partition, shared_model, meta=meta)
