"""Feed-forward pieces for training real models: Linear, Dropout, activations,
LastStep, and for masked sequences Embedding, Masking, ZeroMasked and
MergeDirections.

Every layer here and every recurrent layer follows one small protocol, which
is what ``Sequential`` drives: ``_seq_infer(x) -> y`` (inference) and
``_seq_train(x) -> (y, backprop)`` with ``backprop(dy) -> dx`` (training;
parameter gradients accumulate into ``grads``). Sequence arrays are
batch-first, (B, T, features).
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike, DTypeLike
from scipy.special import expit

from fastrnn import _parallel, _plan
from fastrnn import _validation as v
from fastrnn._kernels import backward as _backward
from fastrnn._kernels import forward as _forward
from fastrnn._module import (Module, call_parameters, check_parameter_memory, config_value,
                             dropout_mask, fill_drawn, filled_later)
from fastrnn.masking import flip_index
from fastrnn._validation import shape_str


def _checked_dy(module, owner, dy, y_shape, version):
    """The dy of a parametrised layer's backprop, checked: the shape of the
    forward's output, and the forward's parameter set still the module's."""
    dy = v.to_numpy(owner, "dy", dy)
    if dy.shape != y_shape:
        raise ValueError(f"{owner}: expected dy of the output's shape {shape_str(y_shape)}, "
                         f"got {shape_str(dy.shape)}")
    if module._version != version:
        raise RuntimeError(f"{owner}: the parameters changed after the forward "
                           f"(load_state_dict or an optimizer step)")
    return dy


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
        check_parameter_memory("Linear", cfg["dtype"].itemsize * sum(
            math.prod(shape) for shape in shapes.values()),
            [("in_features", cfg["in_features"]), ("out_features", cfg["out_features"])])
        grads = {}
        for name, shape in shapes.items():
            grads[name] = np.zeros(shape, cfg["dtype"])
            storage = np.zeros(shape, cfg["dtype"])
            if not filled_later():
                fill_drawn(storage, lambda n: rng.uniform(-bound, bound, size=n))
            self._register(name, self._add_storage(storage, grads[name]))
        self._seal_parameters()
        self._grads = MappingProxyType(grads)

    def __repr__(self):
        cfg = self._config
        extra = "" if cfg["bias"] else ", bias=False"
        extra += "" if cfg["dtype"] == np.float32 else f", dtype='{cfg['dtype'].name}'"
        return f"Linear({cfg['in_features']}, {cfg['out_features']}{extra})"

    def __getattr__(self, name):
        # PyTorch's Linear(bias=False).bias is None (code asks `is not None`);
        # with a bias, ``bias`` is the parameter (Module.__getattr__)
        if name == "bias" and not self.__dict__.get("_config", {}).get("bias", True):
            return None
        return super().__getattr__(name)

    def _check(self, x):
        owner = type(self).__name__   # (QuantizedLinear's too)
        x = v.as_float_array(owner, "input", x, self._config["dtype"])
        n_in = self._config["in_features"]
        if x.ndim == 0 or x.shape[-1] != n_in:
            raise ValueError(f"{owner}: expected input of shape (..., {n_in}), "
                             f"got {shape_str(x.shape)}")
        return x

    def __call__(self, x: ArrayLike) -> np.ndarray:
        return self._forward(self._check(x), call_parameters(self))

    @staticmethod
    def _forward(x, params):
        """y of x under one parameter set (taken once per call). float32:
        fastrnn's own product over the weight packed once per set, where each
        output is one fixed chain of multiply-adds, so that a row's result
        is the same bits whatever the other rows and the thread count (BLAS
        rounds a row by the call's shape: a streamed model's outputs were not
        one call's); float64: scipy's BLAS at one thread (_parallel.matmul)."""
        kernel = params.cache.get("linear")
        if kernel is None:   # float32: W packed as an RNN layer's W_ih (one gate of N units)
            weight, bias = params.views["weight"], params.views.get("bias")
            packed = None if weight.dtype != np.float32 else _forward.pack_projection(
                weight, _forward.CELL_RNN_TANH, weight.shape[0], 1)
            kernel = params.cache["linear"] = (weight, bias, packed)
        weight, bias, packed = kernel
        if packed is None:   # (scipy's BLAS at one thread: see _parallel.matmul)
            y = _parallel.matmul(x.reshape(-1, x.shape[-1]), weight.T).reshape(
                x.shape[:-1] + (weight.shape[0],))
            if bias is not None:
                y += bias
            return y
        rows = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
        R, N = rows.shape[0], weight.shape[0]
        y = np.empty((R, N), np.float32)
        parts = [(0, R)] if R * N * rows.shape[1] < _plan.MIN_PARALLEL_WORK else \
            _plan.chunks(R, _parallel.get_num_threads())
        _forward.project(x=np.ascontiguousarray(rows), w_ih=weight, bias_x=bias, gx=y,
                         max_rows=v.BLAS_INT_MAX, parts=parts, packed=packed, hidden_size=N)
        return y if x.ndim == 2 else y.reshape(x.shape[:-1] + (N,))

    _seq_infer = __call__

    def _seq_train(self, x):
        x = self._check(x)
        params = call_parameters(self)
        y = self._forward(x, params)
        version, y_shape = params.version, y.shape

        def backprop(dy):
            dy = _checked_dy(self, "Linear.backprop", dy, y_shape, version)
            x2 = x.reshape(-1, x.shape[-1])
            dy2 = dy.reshape(-1, dy.shape[-1])
            # scipy's BLAS at one thread, not numpy's: its threads, idle, spin and
            # took the core from fastrnn's (a per-step Linear(128, 10) after an
            # LSTM 64->128, B=32, T=100: a training step 35 ms, 15 with them
            # held; PyTorch 18)
            weight_grad = _parallel.row_products(dy2, x2)
            with self._grad_lock:
                np.add(self._grads["weight"], weight_grad, out=self._grads["weight"])
                if "bias" in self._grads:
                    np.add(self._grads["bias"], _parallel.column_sums(dy2), out=self._grads["bias"])
                self._grads_zeroed = False
            return _parallel.matmul(dy2, params.views["weight"]).reshape(
                dy.shape[:-1] + (params.views["weight"].shape[1],))

        return y, backprop


class _Stateless:
    """A layer without parameters (nothing to train, save or load). Its
    settings (``_config``) read as attributes and are fixed, as a layer's
    are: ``Dropout(0.9).p = 0`` had been taken and ignored."""
    _trainable = ()
    _version = 0
    _grad_lock = contextlib.nullcontext()

    def __getattr__(self, name):
        # only reached when ordinary lookup fails
        config = self.__dict__.get("_config", {})
        if name in config:
            return config_value(config[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_config", ()):
            raise AttributeError(f"{type(self).__name__}: {name} is fixed at construction; "
                                 f"create a new {type(self).__name__} to change it")
        object.__setattr__(self, name, value)

    def zero_grad(self) -> None:
        pass

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike], strict: bool = True) -> None:
        strict = v.check_bool(f"{type(self).__name__}.load_state_dict", "strict", strict)
        if strict and state_dict:
            raise ValueError(f"{type(self).__name__}: has no parameters, got keys "
                             f"{list(state_dict)}")

    def __call__(self, x: ArrayLike) -> np.ndarray:
        # numbers only, as the recurrent layers take (a bool array came back
        # as int64 from ReLU, and strings reached numpy's ufunc errors)
        return self._seq_infer(v.to_numpy(type(self).__name__, "input", x))

    save = Module.save   # (one file: see fastrnn.save)

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
    _passes_values = True   # (the caller's values, or zeros: _own_values.own_inputs)

    def __init__(self, p: float = 0.5, seed: int | np.random.Generator | None = None) -> None:
        self._config = {"p": v.check_dropout("Dropout", p)}
        self._rng = v.check_seed("Dropout", seed)

    def __copy__(self):
        # its own generator, as a layer's copy has (copy.copy handed it this
        # one: training either advanced both, the copy's masks changed)
        twin = object.__new__(type(self))      # (a subclass stays one)
        twin.__dict__.update(self.__dict__)
        twin.__dict__["_config"] = dict(self._config)
        twin.__dict__["_rng"] = copy.deepcopy(self._rng)
        return twin

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

    @staticmethod
    def _floats(x):
        """Integer features in floating point, as Dropout scales them (numpy
        computes tanh of int8 in float16: 1.6e-4 off)."""
        return x if x.dtype.kind == "f" else x.astype(np.result_type(x.dtype, np.float32))

    def _seq_train(self, x):
        y = self._seq_infer(x)
        return y, lambda dy: dy * self._derivative(x, y)


class ReLU(_Activation):
    """max(x, 0), elementwise."""

    def _seq_infer(self, x):
        return np.maximum(x, 0)

    def _derivative(self, x, y):
        # PyTorch's rule: 0 where x <= 0, else 1 (NaN included: its gradient passes)
        return (~(x <= 0)).astype(x.dtype)


class Tanh(_Activation):
    """tanh(x), elementwise."""

    def _seq_infer(self, x):
        return np.tanh(self._floats(x))

    def _derivative(self, x, y):
        return 1 - y * y


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)), elementwise."""

    def _seq_infer(self, x):
        return expit(self._floats(x))  # no overflow warning at large |x|

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
    taken (the step ``lengths[b] - 1``), not the padding after it; under a
    mask (``Masking``, ``Embedding(mask_zero=True)``), each row's last kept
    step (and the reverse half at its first kept step), a row with none kept
    giving its step T - 1 (and 0) as without a mask; after ``ZeroMasked``
    (Keras' ``zero_output_for_mask``, whose last output is the zeroed step
    T - 1), step T - 1.
    """
    _passes_values = True   # (the caller's values, or zeros: _own_values.own_inputs)

    _takes_mask = True

    def __init__(self, bidirectional: bool = False) -> None:
        self._config = {"bidirectional": v.check_bool("LastStep", "bidirectional",
                                                      bidirectional)}

    def _steps(self, x, lengths, mask):
        """Per row, the step its forward features are taken at and the one
        its reverse half is."""
        if x.ndim != 3 or x.shape[1] == 0:
            raise ValueError(f"LastStep: expected a batch-first sequence of shape (B, T, F) "
                             f"with T >= 1, got {shape_str(x.shape)}")
        if self._config["bidirectional"] and x.shape[2] % 2:
            raise ValueError(f"LastStep: bidirectional input needs an even feature size, "
                             f"got {x.shape[2]}")
        B, T = x.shape[:2]
        if mask is not None:
            # (a masked Linear's output holds values at its masked steps: taking
            # step T - 1 gave a padded step's)
            kept = mask.any(axis=1)
            last = np.where(kept, T - 1 - np.argmax(mask[:, ::-1], axis=1), T - 1)
            if not self._config["bidirectional"]:
                return last, 0
            return last, np.where(kept, np.argmax(mask, axis=1), 0)
        if lengths is None:
            return np.full(B, T - 1), 0
        return v.check_lengths("LastStep", lengths, B, T) - 1, 0

    def _take(self, x, last, first):
        """first: the reverse half's step per row, or 0 for every row."""
        rows = np.arange(x.shape[0])
        if not self._config["bidirectional"]:
            return x[rows, last]
        half = x.shape[2] // 2
        return np.concatenate([x[rows, last, :half], x[rows, first, half:]], axis=1)

    def _seq_infer(self, x, lengths=None, mask=None):
        return self._take(x, *self._steps(x, lengths, mask))

    def _seq_train(self, x, lengths=None, mask=None):
        last, first = self._steps(x, lengths, mask)
        y = self._take(x, last, first)
        rows = np.arange(x.shape[0])

        def backprop(dy):
            dx = np.zeros(x.shape, dy.dtype)
            if not self._config["bidirectional"]:
                dx[rows, last] = dy
            else:
                half = x.shape[2] // 2
                dx[rows, last, :half] = dy[:, :half]
                dx[rows, first, half:] = dy[:, half:]
            return dx

        return y, backprop


# --- masks and embeddings (Keras' Masking / Embedding(mask_zero), PyTorch's Embedding) ----
class Embedding(Module):
    """A lookup table of vectors: integer ids (B, T) -> (B, T, embedding_dim)
    (PyTorch's ``nn.Embedding``, Keras' ``Embedding``).

    Parameters
    ----------
    num_embeddings : int
        Size of the table: ids lie in [0, num_embeddings).
    embedding_dim : int
    padding_idx : int, optional
        As PyTorch's: that row starts at zero and gets no gradient (it stays
        as it is in training). Negative values count from the end.
    mask_zero : bool, default False
        As Keras': id 0 marks padding, and in a ``Sequential`` the layer
        makes the mask ``ids != 0`` that the recurrent layers after it read
        (see ``fastrnn.masking``). Id 0 still has a row of its own (Keras'
        rule: the table needs ``num_embeddings`` = vocabulary + 1).
    dtype : {'float32', 'float64'}, default 'float32'
    seed : None, int or numpy.random.Generator
        ``weight`` (num_embeddings, embedding_dim) starts ~ N(0, 1), PyTorch's
        default.

    Notes
    -----
    Training adds the gradient of each looked-up vector into its row of
    ``grads["weight"]`` (repeated ids add up), so any optimizer trains the
    table. Ids may be given as integers or as floats holding whole numbers
    (as a ragged list padded by ``Sequential.fit`` is).
    """
    _takes_ids = True

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: int | None = None, mask_zero: bool = False,
                 dtype: DTypeLike = "float32",
                 seed: int | np.random.Generator | None = None) -> None:
        super().__init__()
        cfg = self._config
        cfg["num_embeddings"] = v.check_int("Embedding", "num_embeddings", num_embeddings)
        cfg["embedding_dim"] = v.check_int("Embedding", "embedding_dim", embedding_dim)
        n = cfg["num_embeddings"]
        if padding_idx is not None:
            if isinstance(padding_idx, (bool, np.bool_)) or \
                    not isinstance(padding_idx, (int, np.integer)):
                raise TypeError(f"Embedding: padding_idx must be an int or None, got "
                                f"{padding_idx!r}")
            if not -n <= padding_idx < n:
                raise ValueError(f"Embedding: padding_idx must lie in [-{n}, {n}) "
                                 f"(num_embeddings {n}), got {padding_idx}")
            padding_idx = int(padding_idx) % n
        cfg["padding_idx"] = padding_idx
        cfg["mask_zero"] = v.check_bool("Embedding", "mask_zero", mask_zero)
        cfg["dtype"] = v.check_dtype("Embedding", dtype)
        rng = v.check_seed("Embedding", seed)
        shape = (n, cfg["embedding_dim"])
        check_parameter_memory("Embedding", cfg["dtype"].itemsize * n * cfg["embedding_dim"],
                               [("num_embeddings", n),
                                ("embedding_dim", cfg["embedding_dim"])])
        grad = np.zeros(shape, cfg["dtype"])
        table = np.zeros(shape, cfg["dtype"])
        if not filled_later():
            fill_drawn(table, lambda count: rng.standard_normal(count))
        if padding_idx is not None:
            table[padding_idx] = 0
        self._register("weight", self._add_storage(table, grad))
        self._seal_parameters()
        self._grads = MappingProxyType({"weight": grad})

    @property
    def _makes_mask(self):
        return self._config["mask_zero"]

    def __repr__(self):
        cfg = self._config
        extra = "" if cfg["padding_idx"] is None else f", padding_idx={cfg['padding_idx']}"
        extra += ", mask_zero=True" if cfg["mask_zero"] else ""
        extra += "" if cfg["dtype"] == np.float32 else f", dtype='{cfg['dtype'].name}'"
        return f"Embedding({cfg['num_embeddings']}, {cfg['embedding_dim']}{extra})"

    def _ids(self, ids, owner="Embedding", name="input"):
        arr = v.to_numpy(owner, name, ids)
        if arr.dtype.kind == "f":
            whole = np.isfinite(arr).all() and (arr == np.round(arr)).all()
            if not whole:
                raise TypeError(f"{owner}: {name} must hold integer ids, got dtype "
                                f"{arr.dtype} with values that are not whole numbers")
        n = self._config["num_embeddings"]
        if arr.size and (arr.min() < 0 or arr.max() >= n):   # before a float's cast could wrap
            spec = "g" if arr.dtype.kind == "f" else "d"   # (int ids printed whole)
            raise ValueError(f"{owner}: {name} ids must lie in [0, {n}) (num_embeddings), got "
                             f"values from {arr.min():{spec}} to {arr.max():{spec}}")
        return arr.astype(np.int64) if arr.dtype.kind == "f" else arr

    def _check_ids(self, owner, x, name):
        """x of a Sequential whose first layer this is: ids (N, T)."""
        arr = self._ids(x, owner, name)
        if arr.ndim != 2:
            raise ValueError(f"{owner}: expected {name} of shape (N, T) (integer ids: "
                             f"samples, steps), got {shape_str(arr.shape)}")
        return arr

    def _seq_mask(self, ids):
        return np.asarray(ids) != 0

    def __call__(self, ids: ArrayLike) -> np.ndarray:
        """The vectors of ``ids`` (any shape): shape ``ids.shape + (embedding_dim,)``."""
        return call_parameters(self).views["weight"][self._ids(ids)]

    def compute_mask(self, ids: ArrayLike) -> np.ndarray | None:
        """Keras' mask of ``ids`` (``ids != 0``) with ``mask_zero``, else None."""
        return self._seq_mask(self._ids(ids)) if self._config["mask_zero"] else None

    _seq_infer = __call__

    def _seq_train(self, ids):
        ids = self._ids(ids)
        params = call_parameters(self)
        y = params.views["weight"][ids]
        version, y_shape = params.version, y.shape
        padding = self._config["padding_idx"]

        def backprop(dy):
            dy = _checked_dy(self, "Embedding.backprop", dy, y_shape, version)
            flat_ids = ids.reshape(-1)
            flat_dy = dy.reshape(-1, y_shape[-1])
            if padding is not None:
                keep = flat_ids != padding
                flat_ids, flat_dy = flat_ids[keep], flat_dy[keep]
            grad = self._grads["weight"]
            flat_ids = np.ascontiguousarray(flat_ids, dtype=np.int64)
            flat_dy = np.ascontiguousarray(flat_dy, dtype=grad.dtype)
            with self._grad_lock:   # (np.add.at's sums, 10-20x faster)
                _backward.add_rows(grad, flat_ids, flat_dy)
                self._grads_zeroed = False
            return None     # ids have no gradient

        return y, backprop


class Masking(_Stateless):
    """Keras' ``Masking``: in a ``Sequential``, the steps whose features all
    equal ``mask_value`` are masked for the recurrent layers after it, and
    zeroed in the output (as Keras does).

    Parameters
    ----------
    mask_value : float, default 0.0
    """
    _passes_values = True   # (the caller's values, or zeros: _own_values.own_inputs)
    _makes_mask = True

    def __init__(self, mask_value: float = 0.0) -> None:
        # (a numpy complex is an np.number: float() dropped its imaginary part)
        if isinstance(mask_value, (bool, np.bool_)) or not isinstance(mask_value, numbers.Real):
            raise TypeError(f"Masking: mask_value must be a real number, got {mask_value!r}")
        self._config = {"mask_value": float(mask_value)}

    def _check(self, x):
        x = v.to_numpy("Masking", "input", x)
        if x.ndim != 3:
            raise ValueError(f"Masking: expected a batch-first sequence of shape (B, T, F), got "
                             f"{shape_str(x.shape)}")
        return x

    def _seq_mask(self, x):
        return (self._check(x) != self._config["mask_value"]).any(axis=-1)

    def compute_mask(self, x: ArrayLike) -> np.ndarray:
        """The mask (B, T): True where some feature differs from mask_value."""
        return self._seq_mask(x)

    def _seq_infer(self, x):
        x = self._check(x)
        return x * self._seq_mask(x)[..., None].astype(x.dtype)

    def _seq_train(self, x):
        x = self._check(x)
        keep = self._seq_mask(x)[..., None].astype(x.dtype if x.dtype.kind == "f"
                                                   else np.float64)
        return x * keep, lambda dy: dy * keep


class ZeroMasked(_Stateless):
    """Zero the masked steps of a sequence (Keras' ``zero_output_for_mask=True``,
    which ``Bidirectional`` forces when it returns sequences). In a
    ``Sequential`` after a recurrent layer; the identity without a mask.

    Parameters
    ----------
    reverse : bool, default False
        Zero the steps the time-reversed mask marks: after a
        ``Reversed(layer, keep_order=False)`` (Keras' ``go_backwards``),
        whose output runs in reversed order while the mask passed on stays
        in the input's (as Keras passes it).
    """
    _passes_values = True   # (the caller's values, or zeros: _own_values.own_inputs)
    _takes_mask = True

    def __init__(self, reverse: bool = False) -> None:
        self._config = {"reverse": v.check_bool("ZeroMasked", "reverse", reverse)}

    @property
    def _flips_steps(self):
        """Whether it reverses the mask (a ragged batch's lengths then keep
        each sequence's within its length: masking.seq_call)."""
        return self._config["reverse"]

    def _keep(self, x, mask, lengths):
        if self._config["reverse"]:
            # within each length where a ragged batch gives them, as its
            # Reversed(keep_order=False) reversed the output
            mask = (mask[:, ::-1] if lengths is None else
                    np.take_along_axis(mask, flip_index(mask.shape[1], lengths,
                                                        mask.shape[0]), axis=1))
        return mask[..., None].astype(x.dtype)

    def _seq_infer(self, x, mask=None, lengths=None):
        if mask is None:
            return x
        return x * self._keep(x, mask, lengths)

    def _seq_train(self, x, mask=None, lengths=None):
        if mask is None:
            return x, lambda dy: dy
        keep = self._keep(x, mask, lengths)
        return x * keep, lambda dy: dy * keep


class MergeDirections(_Stateless):
    """Merge the two directions of a bidirectional layer's output, Keras'
    ``Bidirectional(merge_mode=...)``: the last axis holds [forward, reverse]
    halves of H features each.

    Parameters
    ----------
    mode : {'sum', 'mul', 'ave', 'concat', None}, default 'sum'
        (Keras' default is 'concat', fastrnn's own output: pass it to keep
        both halves.) 'sum', 'mul', 'ave': (..., 2H) -> (..., H), elementwise. 'concat':
        the identity (fastrnn's own output). None: (..., 2H) -> (..., 2, H),
        the directions stacked on a new axis, forward first: where Keras
        returns the list ``[forward, backward]``, ``y[..., 0, :]`` and
        ``y[..., 1, :]`` are its items (``list(np.moveaxis(y, -2, 0))``), and
        the samples stay first so ``Sequential.predict`` batches it.
    """

    def __init__(self, mode: str | None = "sum") -> None:
        if mode is not None and not isinstance(mode, str):   # (np.array("sum") compared equal)
            raise TypeError(f"MergeDirections: mode must be 'sum', 'mul', 'ave', 'concat' or "
                            f"None, got {type(mode).__name__} {mode!r}")
        if mode not in ("sum", "mul", "ave", "concat", None):
            raise ValueError(f"MergeDirections: mode must be 'sum', 'mul', 'ave', 'concat' or "
                             f"None, got {mode!r}")
        self._config = {"mode": mode}

    def _halves(self, x):
        x = v.to_numpy("MergeDirections", "input", x)
        if x.ndim == 0 or x.shape[-1] % 2:
            raise ValueError(f"MergeDirections: expected input whose last axis holds the two "
                             f"directions (an even size 2H), got {shape_str(x.shape)}")
        half = x.shape[-1] // 2
        return x, x[..., :half], x[..., half:]

    def _seq_infer(self, x):
        x, fwd, bwd = self._halves(x)
        mode = self._config["mode"]
        if mode == "sum":
            return fwd + bwd
        if mode == "mul":
            return fwd * bwd
        if mode == "ave":
            return (fwd + bwd) / x.dtype.type(2) if x.dtype.kind == "f" else (fwd + bwd) / 2
        if mode == "concat":
            return x
        return x.reshape(x.shape[:-1] + (2, fwd.shape[-1]))

    def _seq_train(self, x):
        x, fwd, bwd = self._halves(x)
        mode = self._config["mode"]
        y = self._seq_infer(x)

        def backprop(dy):
            if mode == "sum":
                return np.concatenate([dy, dy], axis=-1)
            if mode == "mul":
                return np.concatenate([dy * bwd, dy * fwd], axis=-1)
            if mode == "ave":
                half = dy / dy.dtype.type(2)
                return np.concatenate([half, half], axis=-1)
            if mode == "concat":
                return dy
            return dy.reshape(x.shape)

        return y, backprop
