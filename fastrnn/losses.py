"""Losses with their gradients, PyTorch's definitions and 'mean' reduction.

``loss(pred, target)`` returns the value; ``loss.value_and_grad(pred, target)``
returns ``(value, dpred)``. Class scores are on the last axis (PyTorch's
cross-entropy puts them on axis 1), so a per-step classifier's (B, T, C)
output needs no transpose.
"""
import numbers

import numpy as np
from scipy.special import expit

from fastrnn import _validation as v
from fastrnn._validation import shape_str


class Loss:
    """Base: validates (pred, target) and reduces."""

    def __call__(self, pred, target):
        return self.value_and_grad(pred, target)[0]

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

    def __repr__(self):
        return f"{type(self).__name__}()"


class MSELoss(Loss):
    """mean((pred - target)^2)."""

    def value_and_grad(self, pred, target):
        pred, target = self._pair(pred, target)
        diff = pred - target
        return float(np.mean(diff * diff)), diff * (pred.dtype.type(2) / diff.size)


class L1Loss(Loss):
    """mean(|pred - target|), the mean absolute error (gradient 0 where equal)."""

    def value_and_grad(self, pred, target):
        pred, target = self._pair(pred, target)
        diff = pred - target
        return float(np.mean(np.abs(diff))), np.sign(diff) / pred.dtype.type(diff.size)


class HuberLoss(Loss):
    """mean of 0.5 d^2 where |d| <= delta, else delta (|d| - 0.5 delta); d = pred - target."""

    def __init__(self, delta=1.0):
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not delta > 0:
            raise ValueError(f"HuberLoss: delta must be a positive number, got {delta!r}")
        self.delta = float(delta)

    def value_and_grad(self, pred, target):
        pred, target = self._pair(pred, target)
        d = pred - target
        small = np.abs(d) <= self.delta
        values = np.where(small, 0.5 * d * d, self.delta * (np.abs(d) - 0.5 * self.delta))
        grad = np.where(small, d, self.delta * np.sign(d)) / pred.dtype.type(d.size)
        return float(values.mean()), grad.astype(pred.dtype, copy=False)

    def __repr__(self):
        return f"HuberLoss(delta={self.delta})"


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy from logits with integer class targets.

    ``pred`` (..., C) logits, ``target`` (...) class indices: per sequence
    (B, C) with (B,), or per step (B, T, C) with (B, T). Targets equal to
    ``ignore_index`` (padded steps) count for nothing; the mean is over the
    others (0 with a zero gradient when every target is ignored).
    """

    def __init__(self, ignore_index=-100):
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"CrossEntropyLoss: ignore_index must be an int, "
                            f"got {type(ignore_index).__name__}")
        self.ignore_index = int(ignore_index)

    def value_and_grad(self, pred, target):
        owner = "CrossEntropyLoss"
        pred = v.to_numpy(owner, "pred", pred)
        if pred.dtype.kind != "f":
            pred = pred.astype(np.float64)
        target = v.to_numpy(owner, "target", target)
        if target.dtype.kind not in "iu":
            raise TypeError(f"{owner}: target must hold integer class indices, "
                            f"got dtype {target.dtype}")
        if pred.ndim < 1 or pred.shape[:-1] != target.shape:
            raise ValueError(f"{owner}: expected pred of shape (..., C) and target of shape "
                             f"(...), got {shape_str(pred.shape)} and {shape_str(target.shape)}")
        if pred.size == 0:
            raise ValueError(f"{owner}: got empty pred and target")
        n_classes = pred.shape[-1]
        valid = target != self.ignore_index
        if valid.any() and (target[valid].min() < 0 or target[valid].max() >= n_classes):
            raise ValueError(f"{owner}: target classes must lie in [0, {n_classes - 1}] "
                             f"(or be ignore_index={self.ignore_index}), got values from "
                             f"{target[valid].min()} to {target[valid].max()}")
        count = int(valid.sum())
        grad = np.zeros_like(pred)
        if count == 0:
            return 0.0, grad
        logits = pred[valid]                                   # (count, C)
        labels = target[valid].astype(np.intp)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_probs = shifted - log_norm
        value = -log_probs[np.arange(count), labels].sum() / count
        probs = np.exp(log_probs)
        probs[np.arange(count), labels] -= 1
        grad[valid] = probs / pred.dtype.type(count)
        return float(value), grad

    def __repr__(self):
        return f"CrossEntropyLoss(ignore_index={self.ignore_index})"


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy from logits, numerically stable; targets in [0, 1].

    ``pos_weight`` (a number or an array broadcast over the last axis) weighs
    the positive term, as PyTorch's.
    """

    def __init__(self, pos_weight=None):
        if pos_weight is not None:
            pos_weight = v.to_numpy("BCEWithLogitsLoss", "pos_weight", pos_weight)
            pos_weight = pos_weight.astype(np.float64)
            if not (np.isfinite(pos_weight).all() and (pos_weight >= 0).all()):
                raise ValueError("BCEWithLogitsLoss: pos_weight must be finite and >= 0")
        self.pos_weight = pos_weight

    def value_and_grad(self, pred, target):
        pred, target = self._pair(pred, target)
        w = 1.0 if self.pos_weight is None else self.pos_weight.astype(pred.dtype)
        # loss = (1 - y) x + (1 + (w - 1) y) softplus(-x)
        scale = 1 + (w - 1) * target
        softplus_neg = np.logaddexp(0, -pred)
        values = (1 - target) * pred + scale * softplus_neg
        sig_neg = expit(-pred)                                  # sigmoid(-x), no overflow
        grad = ((1 - target) - scale * sig_neg) / pred.dtype.type(pred.size)
        return float(values.mean()), grad.astype(pred.dtype, copy=False)


LOSSES = {"mse": MSELoss, "mean_squared_error": MSELoss, "mae": L1Loss,
          "mean_absolute_error": L1Loss, "l1": L1Loss, "huber": HuberLoss,
          "cross_entropy": CrossEntropyLoss, "sparse_categorical_crossentropy": CrossEntropyLoss,
          "bce_with_logits": BCEWithLogitsLoss}


def get_loss(loss):
    """A Loss from a Loss instance or a name such as 'mse'."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss.lower() in LOSSES:
        return LOSSES[loss.lower()]()
    raise ValueError(f"loss must be a fastrnn loss or one of {sorted(LOSSES)}, got {loss!r}")
