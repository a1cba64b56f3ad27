"""Metrics for ``Sequential.compile(metrics=[...])``, with Keras' definitions.

A metric accumulates over the batches of an epoch (or of an ``evaluate``)
and reports one number: ``update_state(y_true, y_pred, sample_weight=None)``
adds a batch, ``result()`` gives the value so far, ``reset_state()`` starts
over. Note the order of the arguments: Keras' ``(y_true, y_pred)``, the
reverse of the losses' PyTorch order ``(pred, target)``.

Each metric computes one value per sample (or per step of a per-step
output): for an accuracy, whether the prediction is right (averaged over the
last axis where Keras averages); for an error, its mean over the last axis.
``result()`` is the mean of every value seen, weighted by the sample weights
when there are any (Keras' rule). An error metric of 1-D targets and
outputs (B,) has one value per sample too, where Keras' has one per batch
(its mean over the last axis takes the batch axis): batches of different
sizes then weigh each sample alike here, each batch alike there.
``Sequential`` hands the metrics only the steps that count: the padded
steps of ragged sequences and the targets equal to the loss's
``ignore_index`` never reach them.

Names ``compile`` accepts: ``'accuracy'`` (or ``'acc'``: binary, categorical
or sparse categorical accuracy, chosen from the shapes of the targets and
outputs as Keras chooses), ``'binary_accuracy'``, ``'categorical_accuracy'``,
``'sparse_categorical_accuracy'``, ``'top_k_categorical_accuracy'``,
``'sparse_top_k_categorical_accuracy'`` (k = 5), ``'mae'``
(``'mean_absolute_error'``), ``'mse'`` (``'mean_squared_error'``),
``'rmse'`` (``'root_mean_squared_error'``), Keras' class names
(``'BinaryAccuracy'``, ...), a ``Metric`` instance, or any function
``fn(y_true, y_pred)`` returning one value per sample (or one per batch).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fastrnn import _validation as v
from fastrnn._validation import shape_str


class Metric:
    """Base of the metrics: a weighted mean of per-sample values.

    A subclass defines ``_values(y_true, y_pred)``, the value of each sample
    (an ndarray), and ``direction``: ``'up'`` if larger is better, ``'down'``
    if smaller is (callbacks in ``mode='auto'`` read it).

    Parameters
    ----------
    name : str, optional
        The key of the metric in the logs and ``History`` (Keras' default
        name of the class when omitted).
    """
    direction = "down"
    default_name = "metric"

    def __init__(self, name: str | None = None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{type(self).__name__}: name must be a str, got "
                            f"{type(name).__name__}")
        self.name = self.default_name if name is None else name
        self.reset_state()

    def reset_state(self) -> None:
        """Forget every batch seen."""
        self._total = 0.0
        self._count = 0.0

    def update_state(self, y_true: ArrayLike, y_pred: ArrayLike,
                     sample_weight: ArrayLike | None = None) -> None:
        """Add a batch.

        Parameters
        ----------
        y_true : ndarray
            The targets.
        y_pred : ndarray
            The model's outputs.
        sample_weight : ndarray, optional
            One weight per sample, or per step of per-step outputs. Values
            that have more axes than the weights are averaged over the extra
            axes first (Keras' rule).

        Raises
        ------
        ValueError
            If the shapes do not fit each other.
        """
        owner = f"{type(self).__name__}.update_state"
        values = np.asarray(self._values(_numbers(owner, "y_true", y_true),
                                         _numbers(owner, "y_pred", y_pred)), dtype=np.float64)
        if sample_weight is None:
            self._total += float(values.sum())
            self._count += values.size
            return
        weight = _numbers(owner, "sample_weight", sample_weight).astype(np.float64)
        if weight.ndim == values.ndim + 1 and weight.shape[-1] == 1:
            weight = weight[..., 0]   # (B, 1) for values (B,): squeezed, as Keras does
        if weight.ndim > values.ndim or values.shape[:weight.ndim] != weight.shape:
            raise ValueError(f"{type(self).__name__}: sample_weight of shape "
                             f"{shape_str(weight.shape)} does not fit the metric's values of "
                             f"shape {shape_str(values.shape)}")
        if values.ndim > weight.ndim:
            values = values.mean(axis=tuple(range(weight.ndim, values.ndim)))
        self._total += float((values * weight).sum())
        self._count += float(weight.sum())

    def result(self) -> float:
        """The weighted mean of the values seen (0.0 before any)."""
        return self._total / self._count if self._count else 0.0

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as JSON values (what ``save`` stores)."""
        return {"name": self.name}

    def __repr__(self):
        args = ", ".join(f"{k}={val!r}" for k, val in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _numbers(owner, name, value):
    """An array of numbers or bools (labels may be bools, as in Keras); a
    string array had numpy's ufunc error, or sorted as strings."""
    if type(value) is np.ndarray and value.dtype.kind in "biuf":   # (the common case: 0.1 us)
        return value
    value = v.ml_dtypes_values(v.as_array(owner, name, value))   # (bfloat16 as float32)
    if value.dtype.kind not in "biuf":
        raise TypeError(f"{owner}: {name} must hold numbers (or bools), got dtype {value.dtype}")
    return value


def _real(y_true, y_pred):
    """The targets and outputs of an error metric in a float type that
    holds their difference: bools and integers in float64 (uint8's 3 - 5
    wrapped to 254, int8's 100 - -100 to -56), float16 in float32 (its
    square of 300 overflowed to inf)."""
    def real(a):
        if a.dtype.kind in "biu":
            return a.astype(np.float64)
        return a.astype(np.float32) if a.dtype.itemsize < 4 else a
    return real(y_true), real(y_pred)


def _same_rank(y_true, y_pred):
    """Keras' squeeze_or_expand_to_same_rank for a trailing axis of 1."""
    if y_true.ndim == y_pred.ndim - 1 and y_pred.shape[-1] == 1:
        return y_true[..., None], y_pred
    if y_pred.ndim == y_true.ndim - 1 and y_true.shape[-1] == 1:
        return y_true, y_pred[..., None]
    return y_true, y_pred


def _check_same_shape(owner, y_true, y_pred):
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{owner}: expected y_true and y_pred of the same shape, got "
                         f"{shape_str(y_true.shape)} and {shape_str(y_pred.shape)}")


def _mean_last(values):
    return values.mean(axis=-1) if values.ndim > 1 else values


def _check_k(owner, k):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{owner}: k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{owner}: k must be >= 1, got {k}")
    return int(k)


def _sparse_labels(owner, y_true, y_pred):
    """Integer class targets of shape y_pred.shape[:-1] (a trailing axis of 1
    dropped, as Keras does)."""
    if y_true.ndim == y_pred.ndim and y_true.shape[-1] == 1:
        y_true = y_true[..., 0]
    if y_true.shape != y_pred.shape[:-1]:
        raise ValueError(f"{owner}: expected y_true of shape {shape_str(y_pred.shape[:-1])} "
                         f"(class indices) for y_pred of shape {shape_str(y_pred.shape)}, got "
                         f"{shape_str(y_true.shape)}")
    return y_true


class BinaryAccuracy(Metric):
    """How often ``y_pred > threshold`` equals the 0/1 target (Keras'
    ``BinaryAccuracy``), averaged over the last axis per sample.

    Parameters
    ----------
    name : str, default 'binary_accuracy'
    threshold : float, default 0.5
        0.5 for probabilities; 0 for logits (what ``compile`` picks when the
        loss is ``BCEWithLogitsLoss``).
    """
    direction = "up"
    default_name = "binary_accuracy"

    def __init__(self, name: str | None = None, threshold: float = 0.5) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"BinaryAccuracy: threshold must be a number, got "
                            f"{type(threshold).__name__}")
        if math.isnan(threshold):   # (every comparison with it is false)
            raise ValueError("BinaryAccuracy: threshold must not be NaN, got nan")
        self.threshold = float(threshold)
        super().__init__(name)

    def _values(self, y_true, y_pred):
        y_true, y_pred = _same_rank(y_true, y_pred)
        _check_same_shape("BinaryAccuracy", y_true, y_pred)
        # a NaN output is a miss (compared false, it counted as a hit of every 0 target)
        return _mean_last((y_true == (y_pred > self.threshold)) & ~np.isnan(y_pred))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold}


class CategoricalAccuracy(Metric):
    """How often the class of the largest output is the target's (one-hot
    targets), Keras' ``CategoricalAccuracy``.

    Parameters
    ----------
    name : str, default 'categorical_accuracy'
    """
    direction = "up"
    default_name = "categorical_accuracy"

    def _values(self, y_true, y_pred):
        _check_same_shape("CategoricalAccuracy", y_true, y_pred)
        return _argmax_hits(y_true.argmax(axis=-1), y_pred)


class SparseCategoricalAccuracy(Metric):
    """How often the class of the largest output is the target class (integer
    targets), Keras' ``SparseCategoricalAccuracy``.

    Parameters
    ----------
    name : str, default 'sparse_categorical_accuracy'
    """
    direction = "up"
    default_name = "sparse_categorical_accuracy"

    def _values(self, y_true, y_pred):
        y_true = _sparse_labels("SparseCategoricalAccuracy", y_true, y_pred)
        return _argmax_hits(y_true, y_pred)


def _argmax_hits(labels, y_pred):
    """Whether the largest score is the target class's. A row holding a NaN
    is a miss, as in the top-k metrics: NumPy's argmax takes a NaN for the
    largest, so a diverged model's NaN outputs scored hits where the NaN
    fell on the target (Keras' argmax skips NaNs instead: no rule a NaN
    output should pass by)."""
    return (labels == y_pred.argmax(axis=-1)) & ~np.isnan(y_pred).any(axis=-1)


def _in_top_k(labels, y_pred, k):
    """Whether the target class's score is among the k largest; ties at the
    boundary count as in (TensorFlow's in_top_k). A row holding a NaN or an
    infinite score is a miss, as there: a diverged model's NaN outputs
    counted as hits (no score compares greater than NaN); so is a target
    outside the classes, as there and in the other accuracies."""
    labels = labels.astype(np.intp)
    n_classes = y_pred.shape[-1]
    known = (labels >= 0) & (labels < n_classes)
    score = np.take_along_axis(y_pred, np.where(known, labels, 0)[..., None], axis=-1)
    return known & np.isfinite(y_pred).all(axis=-1) & ((y_pred > score).sum(axis=-1) < k)


class TopKCategoricalAccuracy(Metric):
    """How often the target class (one-hot) is among the ``k`` largest
    outputs, Keras' ``TopKCategoricalAccuracy``.

    Parameters
    ----------
    k : int, default 5
    name : str, default 'top_k_categorical_accuracy'
    """
    direction = "up"
    default_name = "top_k_categorical_accuracy"

    def __init__(self, k=5, name=None):
        self.k = _check_k("TopKCategoricalAccuracy", k)
        super().__init__(name)

    def _values(self, y_true, y_pred):
        _check_same_shape("TopKCategoricalAccuracy", y_true, y_pred)
        return _in_top_k(y_true.argmax(axis=-1), y_pred, self.k)

    def get_config(self) -> dict[str, Any]:
        return {"k": self.k, "name": self.name}


class SparseTopKCategoricalAccuracy(Metric):
    """How often the target class (integer) is among the ``k`` largest
    outputs, Keras' ``SparseTopKCategoricalAccuracy``.

    Parameters
    ----------
    k : int, default 5
    name : str, default 'sparse_top_k_categorical_accuracy'
    """
    direction = "up"
    default_name = "sparse_top_k_categorical_accuracy"

    def __init__(self, k=5, name=None):
        self.k = _check_k("SparseTopKCategoricalAccuracy", k)
        super().__init__(name)

    def _values(self, y_true, y_pred):
        return _in_top_k(_sparse_labels("SparseTopKCategoricalAccuracy", y_true, y_pred),
                         y_pred, self.k)

    def get_config(self) -> dict[str, Any]:
        return {"k": self.k, "name": self.name}


class MeanAbsoluteError(Metric):
    """Mean of ``|y_pred - y_true|`` (Keras' ``MeanAbsoluteError``).

    Parameters
    ----------
    name : str, default 'mean_absolute_error'
    """
    default_name = "mean_absolute_error"

    def _values(self, y_true, y_pred):
        y_true, y_pred = _same_rank(*_real(y_true, y_pred))
        _check_same_shape("MeanAbsoluteError", y_true, y_pred)
        return _mean_last(np.abs(y_pred - y_true))


class MeanSquaredError(Metric):
    """Mean of ``(y_pred - y_true)^2`` (Keras' ``MeanSquaredError``).

    Parameters
    ----------
    name : str, default 'mean_squared_error'
    """
    default_name = "mean_squared_error"

    def _values(self, y_true, y_pred):
        y_true, y_pred = _same_rank(*_real(y_true, y_pred))
        _check_same_shape("MeanSquaredError", y_true, y_pred)
        diff = y_pred - y_true
        return _mean_last(diff * diff)


class RootMeanSquaredError(MeanSquaredError):
    """Square root of the mean squared error over everything seen (not a
    mean of per-batch roots), Keras' ``RootMeanSquaredError``.

    Parameters
    ----------
    name : str, default 'root_mean_squared_error'
    """
    default_name = "root_mean_squared_error"

    def result(self) -> float:
        # NaN where negative sample weights made the mean negative (as Keras)
        mean = super().result()
        return math.sqrt(mean) if mean >= 0 else math.nan


class MeanMetricWrapper(Metric):
    """A function ``fn(y_true, y_pred)`` as a metric: the mean of the values
    it returns (one per sample, or one per batch), Keras'
    ``MeanMetricWrapper``.

    Parameters
    ----------
    fn : callable
    name : str, optional
        Defaults to the function's ``__name__``.
    direction : {'up', 'down', None}, default None
        Whether larger values are better; None leaves callbacks in
        ``mode='auto'`` unable to tell (they then ask for a mode).
    """
    direction = None

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], Any], name: str | None = None,
                 direction: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"MeanMetricWrapper: fn must be callable, got {type(fn).__name__}")
        if direction not in ("up", "down", None):
            raise ValueError(f"MeanMetricWrapper: direction must be 'up', 'down' or None, got "
                             f"{direction!r}")
        self.fn = fn
        self.direction = direction
        super().__init__(getattr(fn, "__name__", type(fn).__name__) if name is None else name)

    def _values(self, y_true, y_pred):
        return self.fn(y_true, y_pred)

    def __repr__(self):
        return f"MeanMetricWrapper({self.fn!r}, name={self.name!r})"


_CLASSES = (BinaryAccuracy, CategoricalAccuracy, SparseCategoricalAccuracy,
            TopKCategoricalAccuracy, SparseTopKCategoricalAccuracy, MeanAbsoluteError,
            MeanSquaredError, RootMeanSquaredError)
# the classes a saved model may name
METRIC_CLASSES = {cls.__name__: cls for cls in _CLASSES}

_NAMES = {cls.default_name: cls for cls in _CLASSES}
_NAMES.update({"mae": MeanAbsoluteError, "mse": MeanSquaredError,
               "rmse": RootMeanSquaredError})
_NAMES.update(METRIC_CLASSES)

_ACCURACY_NAMES = ("accuracy", "acc")


def names() -> list[str]:
    """The metric names ``compile`` accepts."""
    return sorted(set(_NAMES) | set(_ACCURACY_NAMES))


def direction_of(identifier):
    """'up', 'down' or None for what ``compile`` was given, before the metric
    is built (the accuracies are 'up' whichever one 'accuracy' becomes)."""
    if isinstance(identifier, Metric):
        return identifier.direction
    if isinstance(identifier, str):
        if identifier.lower() in _ACCURACY_NAMES:
            return "up"
        cls = _NAMES.get(identifier)
        return None if cls is None else cls.direction
    return None


def check(owner, identifier):
    """Refuse, by name, what ``get`` could not build; returns the metric's
    name in the logs."""
    if isinstance(identifier, Metric):
        return identifier.name
    if isinstance(identifier, str):
        if identifier.lower() not in _ACCURACY_NAMES and identifier not in _NAMES:
            raise ValueError(f"{owner}: unknown metric {identifier!r}; expected one of "
                             f"{names()}, a fastrnn.metrics.Metric or a function "
                             f"fn(y_true, y_pred)")
        return identifier
    if callable(identifier):
        return getattr(identifier, "__name__", type(identifier).__name__)
    raise TypeError(f"{owner}: a metric must be a name, a fastrnn.metrics.Metric or a function "
                    f"fn(y_true, y_pred), got {type(identifier).__name__}")


def get(identifier, y_true, y_pred, logits=False):
    """The Metric for what ``compile`` was given, resolved as Keras resolves
    it against the first batch's targets and outputs.

    Parameters
    ----------
    identifier : str, Metric or callable
    y_true, y_pred : ndarray
        A batch's targets and outputs ('accuracy' picks binary accuracy if
        the outputs have one column, sparse categorical accuracy if the
        targets have fewer axes or one column, else categorical accuracy).
    logits : bool
        The loss takes logits (BCEWithLogitsLoss): binary accuracies made
        from a name threshold at 0, not 0.5.
    """
    if isinstance(identifier, Metric):
        return identifier
    threshold = 0.0 if logits else 0.5
    if isinstance(identifier, str):
        if identifier.lower() in _ACCURACY_NAMES:
            binary = y_pred.shape[-1] == 1 if y_pred.ndim else True
            sparse = (y_true.ndim < y_pred.ndim
                      or (y_true.ndim and y_true.shape[-1] == 1 and y_pred.shape[-1] > 1))
            if binary:
                return BinaryAccuracy(name=identifier, threshold=threshold)
            if sparse:
                return SparseCategoricalAccuracy(name=identifier)
            return CategoricalAccuracy(name=identifier)
        cls = _NAMES[identifier]
        if cls is BinaryAccuracy:
            return BinaryAccuracy(name=identifier, threshold=threshold)
        return cls(name=identifier)
    return MeanMetricWrapper(identifier)
