"""Feed-forward pieces for training real models: Linear, Dropout, activations
and LastStep.

Every layer here and every recurrent layer follows one small protocol, which
is what ``Sequential`` drives: ``_seq_infer(x) -> y`` (inference) and
``_seq_train(x) -> (y, backprop)`` with ``backprop(dy) -> dx`` (training;
parameter gradients accumulate into ``grads``). Sequence arrays are
batch-first, (B, T, features).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike
from scipy.special import expit

from fastrnn import _validation as v
from fastrnn._module import Module, dropout_mask
from fastrnn._validation import shape_str


class Linear(Module):
    """Affine map of the last axis: ``y = x W^T + b`` (PyTorch's ``nn.Linear``).

    Applies to a vector (in,), a batch (B, in) or every step of a sequence
    (B, T, in).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    dtype : {'float32', 'float64'}, default 'float32'
    seed : None, int or numpy.random.Generator
        ``weight`` (out, in) and ``bias`` (out,) start ~ U(-1/sqrt(in), 1/sqrt(in)),
        PyTorch's default.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: DTypeLike = "float32",
                 seed: int | np.random.Generator | None = None) -> None:
        super().__init__()
        cfg = self._config
        cfg["in_features"] = v.check_int("Linear", "in_features", in_features)
        cfg["out_features"] = v.check_int("Linear", "out_features", out_features)
        cfg["bias"] = v.check_bool("Linear", "bias", bias)
        cfg["dtype"] = v.check_dtype("Linear", dtype)
        rng = v.check_seed("Linear", seed)
        bound = 1.0 / np.sqrt(cfg["in_features"])
        shapes = {"weight": (cfg["out_features"], cfg["in_features"])}
        if cfg["bias"]:
            shapes["bias"] = (cfg["out_features"],)
        grads = {}
        for name, shape in shapes.items():
            grads[name] = np.zeros(shape, cfg["dtype"])
            storage = rng.uniform(-bound, bound, size=shape).astype(cfg["dtype"])
            self._register(name, self._add_storage(storage, grads[name]))
        self._seal_parameters()
        self._grads = MappingProxyType(grads)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this layer to one ``.npz`` file (its configuration, weights
        and random state); ``fastrnn.load`` rebuilds it. See ``fastrnn.save``."""
        from fastrnn.model import save   # model imports this module
        save(self, path)

    def __repr__(self):
        cfg = self._config
        extra = "" if cfg["bias"] else ", bias=False"
        extra += "" if cfg["dtype"] == np.float32 else f", dtype='{cfg['dtype'].name}'"
        return f"Linear({cfg['in_features']}, {cfg['out_features']}{extra})"

    def _check(self, x):
        x = v.as_float_array("Linear", "input", x, self._config["dtype"])
        n_in = self._config["in_features"]
        if x.ndim == 0 or x.shape[-1] != n_in:
            raise ValueError(f"Linear: expected input of shape (..., {n_in}), "
                             f"got {shape_str(x.shape)}")
        return x

    def __call__(self, x: ArrayLike) -> np.ndarray:
        return self._forward(self._check(x), self._params)

    @staticmethod
    def _forward(x, params):
        """y of x under one parameter set (taken once per call)."""
        y = x @ params.views["weight"].T
        if "bias" in params.views:
            y += params.views["bias"]
        return y

    _seq_infer = __call__

    def _seq_train(self, x):
        x = self._check(x)
        params = self._params
        y = self._forward(x, params)
        version, y_shape = params.version, y.shape

        def backprop(dy):
            dy = v.to_numpy("Linear.backprop", "dy", dy)
            if dy.shape != y_shape:
                raise ValueError(f"Linear.backprop: expected dy of the output's shape "
                                 f"{shape_str(y_shape)}, got {shape_str(dy.shape)}")
            if self._version != version:
                raise RuntimeError("Linear.backprop: the parameters changed after the forward "
                                   "(load_state_dict or an optimizer step)")
            x2 = x.reshape(-1, x.shape[-1])
            dy2 = dy.reshape(-1, dy.shape[-1])
            with self._grad_lock:
                np.add(self._grads["weight"], dy2.T @ x2, out=self._grads["weight"])
                if "bias" in self._grads:
                    np.add(self._grads["bias"], dy2.sum(axis=0), out=self._grads["bias"])
            return dy @ params.views["weight"]

        return y, backprop


class _Stateless:
    """A layer without parameters (nothing to train, save or load)."""
    _trainable = ()
    _version = 0
    _grad_lock = contextlib.nullcontext()

    def zero_grad(self) -> None:
        pass

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike], strict: bool = True) -> None:
        if strict and state_dict:
            raise ValueError(f"{type(self).__name__}: has no parameters, got keys "
                             f"{list(state_dict)}")

    def __call__(self, x: ArrayLike) -> np.ndarray:
        return self._seq_infer(np.asarray(x))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this layer to one ``.npz`` file (its configuration, weights
        and random state); ``fastrnn.load`` rebuilds it. See ``fastrnn.save``."""
        from fastrnn.model import save   # model imports this module
        save(self, path)

    def __repr__(self):
        args = ", ".join(f"{k}={val!r}" for k, val in self._config.items())
        return f"{type(self).__name__}({args})"


class Dropout(_Stateless):
    """Zero each element with probability ``p`` in training and scale the rest
    by 1 / (1 - p); the identity in inference.

    Parameters
    ----------
    p : float in [0, 1), default 0.5
    seed : None, int or numpy.random.Generator
        Source of the masks.
    """

    def __init__(self, p: float = 0.5, seed: int | np.random.Generator | None = None) -> None:
        self._config = {"p": v.check_dropout("Dropout", p)}
        self._rng = v.check_seed("Dropout", seed)

    def _seq_infer(self, x):
        return x

    def _seq_train(self, x):
        p = self._config["p"]
        if p == 0:
            return x, lambda dy: dy
        if x.dtype.kind != "f":  # integer features: scale in floating point
            x = x.astype(np.result_type(x.dtype, np.float32))
        mask = dropout_mask(self._rng, x.shape, p, x.dtype)
        return x * mask, lambda dy: dy * mask


class _Activation(_Stateless):
    def __init__(self) -> None:
        self._config = {}

    def _seq_train(self, x):
        y = self._seq_infer(x)
        return y, lambda dy: dy * self._derivative(x, y)


class ReLU(_Activation):
    """max(x, 0), elementwise."""

    def _seq_infer(self, x):
        return np.maximum(x, 0)

    def _derivative(self, x, y):
        return (x > 0).astype(x.dtype)


class Tanh(_Activation):
    """tanh(x), elementwise."""

    def _seq_infer(self, x):
        return np.tanh(x)

    def _derivative(self, x, y):
        return 1 - y * y


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)), elementwise."""

    def _seq_infer(self, x):
        return expit(x)  # no overflow warning at large |x|

    def _derivative(self, x, y):
        return y * (1 - y)


class LastStep(_Stateless):
    """The last step of a batch-first sequence: (B, T, F) -> (B, F).

    Put it after a recurrent layer to feed a ``Linear`` one vector per sequence
    (Keras' ``return_sequences=False``). With ``bidirectional=True`` the input's
    features are [forward, reverse] halves and the reverse half is taken at the
    first step, where that direction ends: the result is both directions'
    final states, as Keras' ``Bidirectional`` gives. In a ``Sequential`` run
    on sequences of different lengths, each sequence's own last step is
    taken (the step ``lengths[b] - 1``), not the padding after it.
    """

    def __init__(self, bidirectional: bool = False) -> None:
        self._config = {"bidirectional": v.check_bool("LastStep", "bidirectional",
                                                      bidirectional)}

    def _check(self, x, lengths):
        if x.ndim != 3 or x.shape[1] == 0:
            raise ValueError(f"LastStep: expected a batch-first sequence of shape (B, T, F) "
                             f"with T >= 1, got {shape_str(x.shape)}")
        if self._config["bidirectional"] and x.shape[2] % 2:
            raise ValueError(f"LastStep: bidirectional input needs an even feature size, "
                             f"got {x.shape[2]}")
        if lengths is None:
            return np.full(x.shape[0], x.shape[1] - 1)
        return v.check_lengths("LastStep", lengths, x.shape[0], x.shape[1]) - 1

    def _seq_infer(self, x, lengths=None):
        last = self._check(x, lengths)
        rows = np.arange(x.shape[0])
        if not self._config["bidirectional"]:
            return x[rows, last]
        half = x.shape[2] // 2
        return np.concatenate([x[rows, last, :half], x[:, 0, half:]], axis=1)

    def _seq_train(self, x, lengths=None):
        last = self._check(x, lengths)
        y = self._seq_infer(x, lengths)
        rows = np.arange(x.shape[0])

        def backprop(dy):
            dx = np.zeros(x.shape, dy.dtype)
            if not self._config["bidirectional"]:
                dx[rows, last] = dy
            else:
                half = x.shape[2] // 2
                dx[rows, last, :half] = dy[:, :half]
                dx[:, 0, half:] = dy[:, half:]
            return dx

        return y, backprop
