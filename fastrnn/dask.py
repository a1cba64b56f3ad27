"""Batch scoring on Dask (dask is optional: ``pip install "dask[array,distributed]"``).

``predict(model, x)`` scores a Dask array of sequences block by block on
whatever scheduler is active: threads, processes, or a ``distributed``
cluster. The model is one task of the graph that every block's task depends
on, so a cluster ships it to each worker once, not once per block; blocks
are scored with the inference path, the results those of
``model.predict`` on the whole array (bit for bit in float32; in float64,
whose products are BLAS calls whose rounding depends on the rows in a
call, to rounding: 6e-17 measured). The model in the graph is a copy taken
when ``predict`` is called: every block is scored with those weights, even
if the model is trained or loaded meanwhile (without the copy a local
scheduler's blocks would read the live model, some before a load and some
after). A model holding a ``Stateful`` layer is
refused: it carries its state from one batch to the next, but the blocks are
scored in any order, on any worker, so no state could carry across them. To
use a real cluster, connect a client first::

    from dask.distributed import Client
    client = Client("tcp://scheduler-address:8786")
    scores = fastrnn.dask.predict(model, sequences).compute()
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from fastrnn import _validation as v
from fastrnn.layers import GRU, LSTM, RNN, _RNNBase
from fastrnn.model import Sequential
from fastrnn.wrappers import Stateful, _wrappers


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
    for i, layer in enumerate(model.layers if isinstance(model, Sequential) else ()):
        if any(isinstance(wrapper, Stateful) for wrapper in _wrappers(layer)):
            raise ValueError(
                f"{owner}: model.layers[{i}] ({layer!r}) is or wraps a Stateful, which "
                f"carries its state from one batch to the next; the blocks are scored in "
                f"any order, on any worker, so no state can carry across them (score a "
                f"model of the layer it wraps, or call model.predict)")


def _takes_ids(model):
    return isinstance(model, Sequential) and getattr(model.layers[0], "_takes_ids", False)


def _input_features(model):
    """The feature size the model fixes, or None (an Embedding's ids, or none fixed)."""
    return model._input_features() if isinstance(model, Sequential) else model.input_size


def _check_x_shape(model, shape, owner):
    """x's shape against what the model takes, checked here so that the message
    names the user's x, not the one-row trial call (and so that a layer does not
    take a 2-D block for one unbatched sequence)."""
    got = v.shape_str(shape)
    if _takes_ids(model):
        if len(shape) != 2:
            raise ValueError(f"{owner}: expected x of shape (N, T) (integer ids: samples, "
                             f"steps), got {got}")
        return
    features = _input_features(model)
    f = "features" if features is None else features
    right_features = features is None or (len(shape) > 0 and shape[-1] == features)
    if not isinstance(model, Sequential) or model._takes_sequences():
        if len(shape) != 3 or not right_features:
            raise ValueError(f"{owner}: expected x of shape (N, T, {f}) (batch-first "
                             f"sequences: samples, steps, features), got {got}")
        if shape[1] == 0 or shape[2] == 0:
            raise ValueError(f"{owner}: x of shape {got} has no "
                             f"{'steps' if shape[1] == 0 else 'features'}; expected at "
                             f"least one")
    elif len(shape) < 2 or not right_features:
        raise ValueError(f"{owner}: expected x of shape (N, {f}) or (N, T, {f}) (samples "
                         f"first), got {got}")


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


def _score_block(model, block, batch_size, empty):
    # a block of no rows (a filtered array's, say): its empty output, which the
    # model, refusing a batch of none, cannot give
    return empty.copy() if len(block) == 0 else _score(model, block, batch_size)


def predict(model: Sequential | RNN | GRU | LSTM, x: Any, batch_size: int | None = None) -> Any:
    """Score a Dask array of batch-first sequences, (N, T, features).

    Parameters
    ----------
    model : Sequential, or an RNN/GRU/LSTM layer (its output sequence); not
        holding a ``Stateful`` (its state cannot carry across blocks scored
        in any order)
    x : dask.array.Array of shape (N, T, features) ((N, T) ids for a model
        starting with an Embedding); chunked along N as you like (each chunk
        is one task, an empty one gives no rows), whole along the other axes
        (rechunked if not)
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
    if isinstance(getattr(x, "_meta", None), np.ma.MaskedArray):   # (else refused per block)
        raise TypeError("fastrnn.dask.predict: x is a masked dask array, whose mask fastrnn "
                        "does not read; pass dask.array.ma.filled(x, value), and a Masking "
                        "layer where the model should skip those steps")
    # (ml_dtypes' bfloat16 and kin: each block converts, as predict does)
    if v.ml_dtypes_values(np.zeros(0, x.dtype)).dtype.kind not in "fiu":
        raise TypeError(f"fastrnn.dask.predict: x must have a real numeric dtype, got {x.dtype}")
    unknown = [axis for axis in range(1, x.ndim) if any(np.isnan(x.chunks[axis]))]
    if unknown:   # (dask's rechunk failed on them, naming neither x nor the way out)
        raise ValueError(f"fastrnn.dask.predict: x's chunk sizes along axis {unknown[0]} are "
                         f"unknown (NaN); call x.compute_chunk_sizes() first (only the "
                         f"samples axis, 0, may have unknown sizes)")
    _check_x_shape(model, x.shape, "fastrnn.dask.predict")
    if batch_size is not None:   # (a layer's scoring would not look at it)
        batch_size = v.check_int("fastrnn.dask.predict", "batch_size", batch_size)
    x = x.rechunk({axis: -1 for axis in range(1, x.ndim)})
    # the shape and dtype of one sample's output, from a zero sample
    model = _snapshot(model)
    probe = np.asarray(_score(model, np.zeros((1,) + x.shape[1:], x.dtype), batch_size))
    shared_model = dask.delayed(model, pure=True)
    empty = probe[:0].copy()
    blocks = []
    for block, rows in zip(x.to_delayed().ravel(), x.chunks[0]):
        scored = dask.delayed(_score_block, pure=True)(shared_model, block, batch_size, empty)
        blocks.append(da.from_delayed(scored, shape=(rows,) + probe.shape[1:], dtype=probe.dtype))
    scores = da.concatenate(blocks, axis=0)
    # concatenate drops empty blocks between others: put x's chunks back
    # (sizes unknown, as a filtered array's, are kept as they are)
    if any(np.isnan(rows) for rows in x.chunks[0]) or scores.chunks[0] == x.chunks[0]:
        return scores
    return scores.rechunk({0: x.chunks[0]})


def predict_dataframe(model: Sequential | RNN | GRU | LSTM, df: Any, steps: int,
                      features: int | None = None, batch_size: int | None = None) -> Any:
    """Score a Dask dataframe whose rows are flattened sequences: each row's
    ``steps * features`` numeric columns, step-major (all features of step 0,
    then of step 1, ...). Returns a Dask dataframe of the outputs, one row per
    input row (same index), columns ``out_0``, ``out_1``, ...

    ``features`` defaults to the model's input size. For a model starting
    with an Embedding each row holds ``steps`` ids, one per step (features
    is 1, or omitted). The model is taken as by ``predict`` (no ``Stateful``).
    """
    owner = "fastrnn.dask.predict_dataframe"
    dask, _ = _require_dask()
    try:
        import dask.dataframe as dd
        import pandas as pd
    except ImportError:
        raise ImportError(f"{owner} needs dask's dataframes: pip install "
                          f"\"dask[dataframe]\"") from None
    _check_model(model, owner)
    if not isinstance(df, dd.DataFrame):
        hint = " (for a pandas one, pass dask.dataframe.from_pandas(df, npartitions=...))" \
            if isinstance(df, pd.DataFrame) else ""
        raise TypeError(f"{owner}: df must be a dask DataFrame, got {type(df).__name__}{hint}")
    steps = v.check_int(owner, "steps", steps)
    if batch_size is not None:
        batch_size = v.check_int(owner, "batch_size", batch_size)
    if features is not None:
        features = v.check_int(owner, "features", features)
    ids = _takes_ids(model)
    if ids:
        if features not in (None, 1):
            raise ValueError(f"{owner}: the model starts with an Embedding, so a row holds one "
                             f"id per step: features must be 1 (or omitted), got {features}")
        features = 1
    else:
        fixed = _input_features(model)
        if features is None:
            if fixed is None:
                raise TypeError(f"{owner}: features must be given (an int): the model's "
                                f"first layers do not fix it")
            features = fixed
        elif fixed is not None and features != fixed:
            raise ValueError(f"{owner}: features must be the model's input size, {fixed}, "
                             f"got {features}")
    if len(df.columns) != steps * features:
        raise ValueError(f"{owner}: expected {steps} x {features} = "
                         f"{steps * features} columns, got {len(df.columns)}")
    for column, column_dtype in df.dtypes.items():
        if getattr(column_dtype, "kind", "O") not in "fiu":
            raise TypeError(f"{owner}: df's columns must be numeric (int or float), got column "
                            f"{column!r} of dtype {column_dtype}")
    model = _snapshot(model)
    # ids as they are (the Embedding checks them), but pandas' nullable integer
    # columns (Int64, ...) as int64, not the object array they would give;
    # else the model's dtype (float32 always had rounded a float64 model's input)
    dtype = _input_dtype(model)
    if ids:
        kinds = {dt.kind for dt in df.dtypes}
        dtype = (np.float64 if "f" in kinds or kinds == {"i", "u"} else   # (whole: Embedding)
                 np.uint64 if kinds == {"u"} else np.int64)
    # pandas' nullable columns (Int64, Float64, ...) may hold pandas.NA: refused,
    # where a float column's NaN is a number that propagates
    nullable = [column for column, dt in df.dtypes.items() if not isinstance(dt, np.dtype)]
    sample = (steps,) if ids else (steps, features)
    probe = np.asarray(_score(model, np.zeros((1,) + sample, dtype or np.int64), batch_size))
    width = int(np.prod(probe.shape[1:]))
    columns = [f"out_{i}" for i in range(width)]
    shared_model = dask.delayed(model, pure=True)

    def score_partition(part, model):
        if len(part) == 0:   # (as an empty block in predict)
            out = np.empty((0, width), probe.dtype)
        else:
            if nullable and part[nullable].isna().to_numpy().any():
                raise ValueError(f"{owner}: df holds missing values (pandas.NA); fill or "
                                 f"drop them first")
            values = part.to_numpy(dtype=dtype).reshape((len(part),) + sample)
            out = np.asarray(_score(model, values, batch_size)).reshape(len(part), width)
        return pd.DataFrame(out, index=part.index, columns=columns)

    # with df's index (its dtype and name): a default one made the lazy
    # result claim an unnamed int64 index, and to_parquet of a named index
    # failed
    meta = pd.DataFrame({c: pd.Series(dtype=probe.dtype) for c in columns},
                        index=df._meta.index)
    return df.map_partitions(score_partition, shared_model, meta=meta)
