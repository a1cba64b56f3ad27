"""Losses with their gradients: PyTorch's definitions and reductions.

``loss(pred, target)`` returns the value; ``loss.value_and_grad(pred, target)``
returns ``(value, dpred)``. Class scores are on the last axis (PyTorch's
cross-entropy puts them on axis 1), so a per-step classifier's (B, T, C)
output needs no transpose.

Every loss takes ``reduction``: ``'mean'`` (the default), ``'sum'`` or
``'none'`` (the per-element values, with the gradient of their sum), as
PyTorch's. ``Sequential.fit`` weights samples on top of this (its
``sample_weight`` and ``class_weight``, Keras' rule): each element's value is
multiplied by its sample's weight and the mean divides by what the loss
divides by without them.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import expit

from fastrnn import _validation as v
from fastrnn._validation import shape_str

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(owner, reduction):
    return v.check_choice(owner, "reduction", reduction, REDUCTIONS)


def _expand(weights, ndim):
    """weights of shape (B,) or (B, T) reshaped to broadcast over ndim axes."""
    return weights.reshape(weights.shape + (1,) * (ndim - weights.ndim))


class Loss:
    """Base of the losses: validation and reduction.

    A subclass defines ``_elements(pred, target)``, which returns
    ``(values, norm, grad)``: the loss of each element (for cross-entropy, of
    each target), the amount each element adds to the mean's divisor (None
    when every element counts 1), and the gradient of ``values.sum()`` with
    respect to ``pred``; and may define ``_refuse_targets(target, weight,
    dtype)``, which raises for targets it cannot take among those that
    count (in pred's float dtype), and
    ``_check_target_dtype(owner, name, target)``, for a dtype it cannot take
    whatever the predictions (``fit`` asks it of the validation targets
    before training).

    Parameters
    ----------
    reduction : {'mean', 'sum', 'none'}, default 'mean'
        How the per-element values combine, as PyTorch's ``reduction``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        self.reduction = _check_reduction(type(self).__name__, reduction)

    def __call__(self, pred: ArrayLike, target: ArrayLike) -> float | np.ndarray:
        """The loss of ``pred`` against ``target`` (see ``value_and_grad``)."""
        return self.value_and_grad(pred, target)[0]

    def value_and_grad(self, pred: ArrayLike, target: ArrayLike
                       ) -> tuple[float | np.ndarray, np.ndarray]:
        """The loss and its gradient with respect to ``pred``.

        Parameters
        ----------
        pred : ndarray
            The model's output.
        target : ndarray
            What it should be (see the class for the shapes it takes).

        Returns
        -------
        value : float, or ndarray with reduction='none'
            The mean, the sum, or the per-element values.
        dpred : ndarray of pred's shape and dtype
            The gradient of ``value`` (with reduction='none', of the sum of
            the values).

        Raises
        ------
        TypeError, ValueError
            If pred and target do not fit (shapes, dtypes, class indices,
            BCEWithLogitsLoss' targets outside [0, 1]).
        """
        values, norm, grad = self._elements(pred, target)
        self._refuse_targets(target, None, grad.dtype)
        if self.reduction == "none":
            return values, grad
        total = float(values.sum())
        if self.reduction == "sum":
            return total, grad
        count = values.size if norm is None else float(norm.sum())
        if count == 0:
            return 0.0, np.zeros_like(grad)
        return total / count, grad * grad.dtype.type(1.0 / count)

    def _terms(self, pred, target, sample_weight=None, mask=None):
        """(total, count, dtotal) of a batch: the weighted sum of the
        elements' values, the divisor of their mean and the gradient of the
        sum. ``sample_weight`` and ``mask`` (of shape (B,) or (B, T), the
        leading axes of the elements) multiply the values; ``mask`` also
        takes masked elements out of the count (Keras' rule for both). An
        element weighted 0 adds 0, whatever its value (NaN included)."""
        values, norm, grad = self._elements(pred, target)
        weight = None
        if mask is not None:
            mask = _expand(mask.astype(grad.dtype, copy=False), values.ndim)
            norm = np.broadcast_to(mask, values.shape) if norm is None else norm * mask
            weight = mask
        if sample_weight is not None:   # (within the model's float range: fit checks them)
            sample_weight = _expand(sample_weight.astype(grad.dtype, copy=False), values.ndim)
            weight = sample_weight if weight is None else weight * sample_weight
        # (a padded step's or weightless row's: any)
        self._refuse_targets(target, weight, grad.dtype)
        if weight is None:
            count = values.size if norm is None else float(norm.sum())
            return float(values.sum()), count, grad
        # an element that does not count is 0, not 0 times its value: a
        # target left NaN at a masked step must not turn the sum into NaN
        with np.errstate(invalid="ignore"):   # (inf * 0 where it is thrown away)
            values = np.where(weight != 0, values * weight, values.dtype.type(0))
            weight = _expand(np.broadcast_to(weight, values.shape), grad.ndim)
            grad = np.where(weight != 0, grad * weight, grad.dtype.type(0))
        count = values.size if norm is None else float(norm.sum())
        return float(values.sum()), count, grad

    def _refuse_targets(self, target, weight, dtype):
        """Raise for a target this loss cannot take where it counts (weight:
        None, or the elements' weights, 0 where one does not count). Every
        target fits the losses but BCEWithLogitsLoss."""

    def _check_target_dtype(self, owner, name, target):
        """Raise for a target array whose dtype this loss cannot take (every
        numeric dtype fits the losses but CrossEntropyLoss)."""

    def _pair(self, pred, target):
        owner = type(self).__name__
        pred = v.to_numpy(owner, "pred", pred)
        if pred.dtype.kind != "f":
            pred = pred.astype(np.float64)
        target = v.to_numpy(owner, "target", target).astype(pred.dtype, copy=False)
        if pred.shape != target.shape:
            raise ValueError(f"{owner}: pred and target must have the same shape, got "
                             f"{shape_str(pred.shape)} and {shape_str(target.shape)}")
        if pred.size == 0:
            raise ValueError(f"{owner}: got empty pred and target")
        return pred, target

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as JSON values (what ``save`` stores)."""
        return {"reduction": self.reduction}

    def __repr__(self):
        args = ", ".join(f"{k}={val!r}" for k, val in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self):
        """The arguments that differ from their defaults."""
        return {} if self.reduction == "mean" else {"reduction": self.reduction}


class MSELoss(Loss):
    """Mean squared error, ``(pred - target)^2`` per element (PyTorch's
    ``nn.MSELoss``).

    Parameters
    ----------
    reduction : {'mean', 'sum', 'none'}, default 'mean'
    """

    def _elements(self, pred, target):
        pred, target = self._pair(pred, target)
        diff = pred - target
        return diff * diff, None, diff * pred.dtype.type(2)


class L1Loss(Loss):
    """Mean absolute error, ``|pred - target|`` per element (gradient 0 where
    they are equal), PyTorch's ``nn.L1Loss``. One difference, deliberate:
    where ``pred - target`` is NaN the gradient is NaN (PyTorch's sign gives
    0 there, so a diverged output would train on silently).

    Parameters
    ----------
    reduction : {'mean', 'sum', 'none'}, default 'mean'
    """

    def _elements(self, pred, target):
        pred, target = self._pair(pred, target)
        diff = pred - target
        return np.abs(diff), None, np.sign(diff)


class HuberLoss(Loss):
    """Huber loss, PyTorch's ``nn.HuberLoss``: per element
    ``0.5 d^2`` where ``|d| <= delta``, else ``delta (|d| - 0.5 delta)``,
    with ``d = pred - target``.

    Parameters
    ----------
    delta : float > 0, default 1.0
    reduction : {'mean', 'sum', 'none'}, default 'mean'
    """

    def __init__(self, delta: float = 1.0, reduction: str = "mean") -> None:
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
            raise TypeError(f"HuberLoss: delta must be a positive number, got "
                            f"{type(delta).__name__} {delta!r}")
        if not delta > 0:
            raise ValueError(f"HuberLoss: delta must be a positive number, got {delta!r}")
        self.delta = float(delta)
        super().__init__(reduction)

    def _elements(self, pred, target):
        pred, target = self._pair(pred, target)
        d = pred - target
        small = np.abs(d) <= self.delta
        values = np.where(small, 0.5 * d * d, self.delta * (np.abs(d) - 0.5 * self.delta))
        grad = np.where(small, d, self.delta * np.sign(d))
        return (values.astype(pred.dtype, copy=False), None,
                grad.astype(pred.dtype, copy=False))

    def get_config(self) -> dict[str, Any]:
        return {"delta": self.delta, **super().get_config()}

    def _repr_args(self):
        return {"delta": self.delta, **super()._repr_args()}


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy from logits with integer class targets
    (PyTorch's ``nn.CrossEntropyLoss``, the classes on the last axis).

    ``pred`` (..., C) logits, ``target`` (...) class indices: per sequence
    (B, C) with (B,), or per step (B, T, C) with (B, T). Targets equal to
    ``ignore_index`` (padded steps) count for nothing; the mean is over the
    others (0 with a zero gradient when every target is ignored or, with
    ``weight``, every target counted is of a class of weight 0: PyTorch's
    0 / 0 gives NaN there, which would end a fit for a batch that only
    holds such classes).

    Parameters
    ----------
    weight : array-like of C non-negative numbers, optional
        The weight of each class. A target of class ``y`` adds ``weight[y]``
        times its loss, and the mean divides by the sum of the weights of
        the targets (PyTorch's rule).
    ignore_index : int, default -100
    reduction : {'mean', 'sum', 'none'}, default 'mean'
    label_smoothing : float in [0, 1], default 0
        The target distribution becomes ``(1 - label_smoothing)`` on the
        target class plus ``label_smoothing / C`` on every class.

    Notes
    -----
    With ``p = softmax(pred)``, ``w`` the class weights (ones by default),
    ``e = label_smoothing`` and a target ``y``, a target's loss is

    .. math::

        \\ell = -(1 - e)\\, w_y \\log p_y - \\frac{e}{C} \\sum_c w_c \\log p_c

    and ``'mean'`` divides the sum of the targets' losses by
    :math:`\\sum w_y` over the targets not ignored.
    """

    def __init__(self, weight: ArrayLike | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        owner = "CrossEntropyLoss"
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"{owner}: ignore_index must be an int, "
                            f"got {type(ignore_index).__name__}")
        self.ignore_index = int(ignore_index)
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
            raise TypeError(f"{owner}: label_smoothing must be a number, got "
                            f"{type(label_smoothing).__name__}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"{owner}: label_smoothing must lie in [0, 1], got "
                             f"{label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        if weight is not None:
            weight = v.to_numpy(owner, "weight", weight)
            if weight.dtype.kind not in "iuf":
                raise TypeError(f"{owner}: weight must hold numbers, got dtype {weight.dtype}")
            weight = weight.astype(np.float64)
            if weight.ndim != 1 or weight.size == 0:
                raise ValueError(f"{owner}: expected weight of shape (C,), one per class, got "
                                 f"{shape_str(weight.shape)}")
            if not (np.isfinite(weight).all() and (weight >= 0).all()):
                raise ValueError(f"{owner}: weight must be finite and >= 0")
        self.weight = weight
        super().__init__(reduction)

    def _check_target_dtype(self, owner, name, target):
        if target.dtype.kind not in "iu":
            raise TypeError(f"{owner}: {name} must hold integer class indices, "
                            f"got dtype {target.dtype}")

    def _check(self, pred, target):
        owner = "CrossEntropyLoss"
        pred = v.to_numpy(owner, "pred", pred)
        if pred.dtype.kind != "f":
            pred = pred.astype(np.float64)
        target = v.to_numpy(owner, "target", target)
        self._check_target_dtype(owner, "target", target)
        if pred.ndim < 1 or pred.shape[:-1] != target.shape:
            raise ValueError(f"{owner}: expected pred of shape (..., C) and target of shape "
                             f"(...), got {shape_str(pred.shape)} and {shape_str(target.shape)}")
        if pred.size == 0:
            raise ValueError(f"{owner}: got empty pred and target")
        n_classes = pred.shape[-1]
        if self.weight is not None and self.weight.size != n_classes:
            raise ValueError(f"{owner}: weight has {self.weight.size} entries but pred has "
                             f"{n_classes} classes (its last axis)")
        valid = target != self.ignore_index
        if valid.any() and (target[valid].min() < 0 or target[valid].max() >= n_classes):
            raise ValueError(f"{owner}: target classes must lie in [0, {n_classes - 1}] "
                             f"(or be ignore_index={self.ignore_index}), got values from "
                             f"{target[valid].min()} to {target[valid].max()}")
        return pred, target, valid

    def _elements(self, pred, target):
        pred, target, valid = self._check(pred, target)
        dtype = pred.dtype.type
        n_classes = pred.shape[-1]
        every = bool(valid.all())
        values = np.zeros(target.shape, pred.dtype)
        grad = np.zeros_like(pred)
        weight = None if self.weight is None else self.weight.astype(pred.dtype)
        norm = None if every and weight is None else valid.astype(pred.dtype)
        count = int(valid.sum())
        if count == 0:
            return values, norm, grad
        logits = pred if every else pred[valid]                  # (..., C) or (count, C)
        labels = (target if every else target[valid]).astype(np.intp)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        probs = np.exp(log_probs)
        e = self.label_smoothing
        if weight is None:
            loss = -picked
            if e:
                loss = (1 - dtype(e)) * loss - dtype(e / n_classes) * log_probs.sum(axis=-1)
            d_logits = probs
            np.put_along_axis(d_logits, labels[..., None],
                              np.take_along_axis(d_logits, labels[..., None], axis=-1)
                              - (1 - dtype(e)), axis=-1)
            if e:
                d_logits -= dtype(e / n_classes)
        else:
            w_target = weight[labels]
            loss = -w_target * picked
            d_logits = probs * w_target[..., None]
            np.put_along_axis(d_logits, labels[..., None],
                              np.take_along_axis(d_logits, labels[..., None], axis=-1)
                              - w_target[..., None], axis=-1)
            if e:
                smooth = -(log_probs * weight).sum(axis=-1)
                loss = (1 - dtype(e)) * loss + dtype(e / n_classes) * smooth
                d_logits *= 1 - dtype(e)
                d_logits += dtype(e / n_classes) * (probs * weight.sum() - weight)
            if every:
                norm = w_target
            else:
                norm[valid] = w_target
        if every:
            return loss.astype(pred.dtype, copy=False), norm, d_logits
        values[valid] = loss
        grad[valid] = d_logits
        return values, norm, grad

    def get_config(self) -> dict[str, Any]:
        return {"weight": None if self.weight is None else self.weight.tolist(),
                "ignore_index": self.ignore_index, "label_smoothing": self.label_smoothing,
                **super().get_config()}

    def _repr_args(self):
        args = {"ignore_index": self.ignore_index}
        if self.weight is not None:
            args["weight"] = self.weight.tolist()
        if self.label_smoothing:
            args["label_smoothing"] = self.label_smoothing
        return {**args, **super()._repr_args()}


def _broadcasts_within(shape, over):
    """Whether an array of ``shape`` broadcasts over one of ``over`` and
    leaves its shape as it is."""
    try:
        return np.broadcast_shapes(shape, over) == tuple(over)
    except ValueError:
        return False


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy from logits, numerically stable; targets in [0, 1]
    (PyTorch's ``nn.BCEWithLogitsLoss``; a target outside [0, 1] is refused
    with a ValueError, where PyTorch returns a loss that means nothing,
    unless it does not count: a masked step's or a row's of sample weight 0).

    Parameters
    ----------
    pos_weight : float or array-like, optional
        Weighs the positive term (a number, or an array broadcast over the
        last axis), as PyTorch's.
    reduction : {'mean', 'sum', 'none'}, default 'mean'

    Notes
    -----
    Per element, with ``w`` the positive weight (1 by default):

    .. math::

        \\ell = (1 - y)\\, x + (1 + (w - 1)\\, y) \\log(1 + e^{-x})
    """

    def __init__(self, pos_weight: ArrayLike | None = None, reduction: str = "mean") -> None:
        if pos_weight is not None:
            pos_weight = v.to_numpy("BCEWithLogitsLoss", "pos_weight", pos_weight)
            pos_weight = pos_weight.astype(np.float64)
            if not (np.isfinite(pos_weight).all() and (pos_weight >= 0).all()):
                raise ValueError("BCEWithLogitsLoss: pos_weight must be finite and >= 0")
        self.pos_weight = pos_weight
        super().__init__(reduction)

    def _refuse_targets(self, target, weight, dtype):
        # (of pred's shape: _elements checked it; a torch tensor that
        # requires grad converts only as there), in pred's dtype as the loss
        # computes it: a float64 target of 1 + 1e-12 is 1 in float32
        given = v.to_numpy("BCEWithLogitsLoss", "target", target)
        target = given.astype(dtype, copy=False)
        outside = (target < 0) | (target > 1)
        if weight is not None:
            outside &= np.broadcast_to(weight, outside.shape) != 0
        if outside.any():   # (the value as given: float32's 1.1 is 1.100000023841858)
            raise ValueError(f"BCEWithLogitsLoss: target must lie in [0, 1] (0/1 labels or "
                             f"probabilities), got {given[outside].flat[0].item()!r} among "
                             f"the targets that count")

    def _elements(self, pred, target):
        pred, target = self._pair(pred, target)
        w = 1.0 if self.pos_weight is None else self.pos_weight.astype(pred.dtype)
        if self.pos_weight is not None and not _broadcasts_within(w.shape, pred.shape):
            raise ValueError(f"BCEWithLogitsLoss: pos_weight of shape {shape_str(w.shape)} "
                             f"does not broadcast over pred of shape {shape_str(pred.shape)} "
                             f"without growing it (a number, or one weight per class: "
                             f"{shape_str(pred.shape[-1:])})")
        # loss = (1 - y) x + (1 + (w - 1) y) softplus(-x)
        scale = 1 + (w - 1) * target
        values = (1 - target) * pred + scale * np.logaddexp(0, -pred)
        grad = (1 - target) - scale * expit(-pred)              # sigmoid(-x), no overflow
        return (values.astype(pred.dtype, copy=False), None,
                grad.astype(pred.dtype, copy=False))

    def get_config(self) -> dict[str, Any]:
        pos_weight = self.pos_weight
        return {"pos_weight": None if pos_weight is None else pos_weight.tolist(),
                **super().get_config()}

    def _repr_args(self):
        args = {} if self.pos_weight is None else {"pos_weight": self.pos_weight.tolist()}
        return {**args, **super()._repr_args()}


LOSSES = {"mse": MSELoss, "mean_squared_error": MSELoss, "mae": L1Loss,
          "mean_absolute_error": L1Loss, "l1": L1Loss, "huber": HuberLoss,
          "cross_entropy": CrossEntropyLoss, "sparse_categorical_crossentropy": CrossEntropyLoss,
          "bce_with_logits": BCEWithLogitsLoss}

# the classes a saved model may name
LOSS_CLASSES = {cls.__name__: cls for cls in (MSELoss, L1Loss, HuberLoss, CrossEntropyLoss,
                                              BCEWithLogitsLoss)}


def get_loss(loss: Loss | str) -> Loss:
    """A Loss from a Loss instance or a name such as 'mse'."""
    return v.instance_or_name("loss", loss, Loss, LOSSES)
