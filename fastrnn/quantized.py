"""Reduced-precision inference (``fastrnn.quantize``): int8 weights, quantized
once, and int8 products with int32 sums; or bfloat16 weights and products
with float32 sums.

A quantized layer, cell or ``Linear`` is its float32 class with the same
call API, whose products run on int8 or bfloat16 (``_quant.pyx``,
``_qkernel.h``). int8:

- weights: symmetric int8 in [-127, 127], ``q = clip(rint(W / s), -127,
  127)`` with ``s = max|W| / 127`` per output row (``per_channel=True``) or
  per weight tensor (each of PyTorch's parameters: ``weight_ih_l0``,
  ``weight_hh_l0_reverse``, ...), quantized once and packed for the
  kernels; the float32 weights are not kept (see Memory below);
- activations: every row quantized when it is used, symmetric int8 with
  its own scale (``max|x_row| / 127``): each step and batch row of the
  input before the input projection, each batch row of h before each
  step's recurrent product (and the reset-before GRU's r * h). A row's
  result therefore never depends on the other rows of the batch. PyTorch's
  dynamic quantization instead takes one asymmetric uint8 scale and zero
  point for the whole input of a product (all rows of all steps for the
  input projection, the whole batch for h), and ONNX Runtime's
  DynamicQuantizeLSTM does the same;
- products: exact int32 sums, the same on every CPU (AMX tiles, AVX-512
  VNNI, AVX2 and the portable build), dequantized as
  ``float(sum) * (s_x * s_w[n])`` plus the float32 bias. A row (of x or
  of W) whose largest magnitude is below 127 times float32's least normal
  (~1.5e-36) quantizes to zeros with scale 0, on every CPU; and where the
  kernels flush subnormals to zero (x86-64, AArch64; other CPUs keep them),
  a product whose scales multiply below the least normal (the two rows'
  largest magnitudes multiplying below ~1.9e-34) is 0;
- state, cell and gate arithmetic: float32, the float layers' own code
  but for sigmoid and tanh, which are rational functions here (within 4e-7
  and 7e-7 absolute of the exact values, against the float layers' few
  ulp: far below the int8 rounding of h at each step, and ~1.4x faster a
  gate pass: ``_gates.pxd.tp``); the multiply-adds of their polynomials
  fused where the CPU has FMA: every build with FMA (GCC or Clang) gives
  the same outputs, bit for bit; the x86-64 portable build and MSVC's
  round them twice.

bfloat16: the weights rounded to bfloat16 once (round to nearest even),
every activation row at every use, each product one float32 chain over the
pairs of k in the order of AVX-512 BF16's ``vdpbf16ps`` (the odd product of
a pair, then the even one, each sum rounded), which the other builds
compute with float32 arithmetic: the same products everywhere, but on AMX
tiles (where the CPU has AMX-BF16), whose ``tdpbf16ps`` sums in its own
order, within float32 rounding of the exact sum (the last bits differ; a
row's result still never depends on the other rows). No scales;
``per_channel`` does not apply.

Memory: a quantized layer, cell or ``Linear`` holds its weight matrices
only as the kernels read them, packed (int8 with a float32 scale per row
and an int32 column term per row, or bfloat16), and its biases in float32:
a quarter (int8) or half (bfloat16) of the float32 weights' bytes, plus
the scales, column terms and padding to the kernels' blocks of rows. No
float32 weight matrix, copy or gradient is kept; ``quantize`` reads the
float model's parameters and leaves the float model as it was.

``state_dict`` gives the weights as held, under PyTorch's names: int8
arrays, each followed by ``<name>_scale``, its float32 scales, one per row
(equal along a tensor with ``per_channel=False``); bfloat16 weights as
their bit patterns in uint16 arrays (no scales); biases float32. They are
read back from the packed weights on each call (an attribute such as
``layer.weight_ih_l0`` too: a read-only int8 or uint16 array).
``load_state_dict`` takes that form back exactly (the outputs are then the
same bits) and checks it: the dtype, the shapes, scales finite and >= 0
(and none subnormal),
no int8 value of -128, a scale with every int8 weight and none with a
float one. It still takes floating-point weights, quantized (or rounded
to bfloat16) as ``quantize`` does, so a float model's ``state_dict`` loads
into its quantized twin. Model files (``fastrnn.save``: ``.npz``, and
``.safetensors`` with the int8 weights as I8 and the bfloat16 ones as
BF16) and pickles hold this state dict, so they take a quarter or half of
the float32 model's bytes; files of quantized models written with float32
weights still load.

Inference only: ``forward_train`` and training in a ``Sequential`` raise
TypeError. The kernel build is picked at import: the float kernels' build
(fastrnn._kernels), or AVX-512 VNNI (and BF16, and AMX's int8 and bf16
tiles) where the CPU has it;
FASTRNN_INT8=baseline, avx2, avx512, vnni, bf16 or amx forces one (for
comparison and testing).
"""
from __future__ import annotations

import copy
import importlib
import inspect
import numbers
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from fastrnn import _kernels, _parallel, _plan
from fastrnn import _validation as v
from fastrnn._engine import padding_mask, steps_run, valid_steps
from fastrnn._kernels import forward as _forward
from fastrnn._module import (LoadResult, Module, call_parameters, filled_later, holding, sealed,
                             latest_parameters, parameters_filled_later, set_parameters,
                             weights_reduced)
from fastrnn._own_values import input_is_own, state_is_own
from fastrnn._validation import as_array, shape_str
from fastrnn.cells import GRUCell, LSTMCell, RNNCell
from fastrnn.layers import GRU, LSTM, RNN
from fastrnn.nn import Linear
from fastrnn.wrappers import _recurrent, _Wrapper

INT8_BUILDS = ("baseline", "avx2", "avx512", "vnni", "bf16", "amx")
WEIGHT_DTYPES = ("int8", "bfloat16")


def _int8_cpu_supports(build):
    features = _kernels._cpu_features()
    if build == "amx":   # bf16's, and AMX's tiles granted to this process
        if not _int8_cpu_supports("bf16"):
            return False
        try:
            return importlib.import_module("fastrnn._quant_amx").AMX
        except ImportError:
            return False
    if build in ("vnni", "bf16"):
        return _kernels.cpu_supports("avx512") and bool(features.get("AVX512VNNI")) and (
            build == "vnni" or bool(features.get("AVX512BF16")))
    return _kernels.cpu_supports(build)


def _load_int8():
    choice = _kernels.env_choice("FASTRNN_INT8")
    if choice not in ("auto",) + INT8_BUILDS:
        raise ImportError(f"fastrnn: FASTRNN_INT8 must be 'auto', 'baseline', 'avx2', "
                          f"'avx512', 'vnni', 'bf16' or 'amx', got {choice!r}")
    if choice != "auto":
        if not _int8_cpu_supports(choice):
            raise ImportError(f"fastrnn: FASTRNN_INT8={choice}, but this CPU lacks its "
                              f"instructions (the build would stop on an illegal instruction)")
        try:
            return _import_int8(choice), choice
        except ModuleNotFoundError:
            _kernels.forced_build_missing("FASTRNN_INT8", choice, "fastrnn._quant")
    # the widest the CPU runs (the float kernels' build, or past AVX-512 its
    # int8 extensions), down to the portable one: the first one that imports
    # (a build for another CPU family lacks some; one may fail to load)
    simd = _kernels.SIMD
    extensions = ("amx", "bf16", "vnni") if simd == "avx512" else ()
    candidates = [b for b in extensions if _int8_cpu_supports(b)]
    candidates += list(reversed(_kernels.BUILDS[:_kernels.BUILDS.index(simd) + 1]))
    for build in candidates:
        try:
            return _import_int8(build), build
        except ImportError:
            if build == "baseline":
                raise


def _import_int8(build):
    return importlib.import_module("fastrnn._quant" + ("" if build == "baseline" else
                                                       "_" + build))


_quant, INT8_SIMD = _load_int8()

class _Stack(NamedTuple):
    kernel: Any      # _quant.QStack
    layers: list     # per layer (w_ih, w_hh, w_hn, bias_x, bias_h)


# the least max |w| of a row with a scale (_qkernel.h's FASTRNN_Q_MIN_AMAX)
MIN_AMAX = np.float32(127) * np.finfo(np.float32).tiny


def quantize_weight(w, per_channel, tensors=1):
    """(q, scale): w (N, K) float32 as symmetric int8 and its float32 scale
    per row. Per tensor (per_channel False), ``tensors`` equal row blocks
    of w are separate tensors (the directions of a stacked weight), one
    scale each."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    if not per_channel:
        amax = np.repeat(amax.reshape(tensors, -1).max(axis=1), w.shape[0] // tensors)
    # a row below _qkernel.h's FASTRNN_Q_MIN_AMAX (its scale would be
    # subnormal, which the kernels flush): zeros, scale 0, as an activation row
    scale = np.where(amax >= MIN_AMAX, amax / np.float32(127), np.float32(0))
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def to_bfloat16(w):
    """float32 w as bfloat16 bit patterns (uint16): round to nearest even,
    float32's denormals to signed zero, inf and NaN kept."""
    bits = np.ascontiguousarray(w, np.float32).view(np.uint32)
    exponent = bits & np.uint32(0x7f800000)
    rounded = bits + np.uint32(0x7fff) + ((bits >> np.uint32(16)) & np.uint32(1))
    bits = np.where(exponent == 0, bits & np.uint32(0x80000000),
                    np.where(exponent == np.uint32(0x7f800000), bits, rounded))
    return (bits >> np.uint32(16)).astype(np.uint16)


SCALE = "_scale"   # the suffix of an int8 weight's scales in a state dict


def _bfloat16_in_range(owner, name, reduced):
    """bfloat16 weights (bits, ones) whose values all stay finite: a float32
    of magnitude 3.3961e38 or more rounds to bfloat16's inf, refused."""
    bits = reduced[0]
    if ((bits & np.uint16(0x7f80)) == np.uint16(0x7f80)).any():
        raise ValueError(f"{owner}: {name} has values beyond bfloat16's range (a magnitude "
                         f"of 3.3961e38 or more rounds to inf); expected finite bfloat16 "
                         f"weights")
    return reduced


def _reduce(w, weight_dtype, per_channel):
    """(q, scale): float32 weight matrix w (N, K) as the kernels take it:
    int8 and its scale per row (per row or one for the whole matrix), or
    bfloat16 bit patterns (uint16) and ones."""
    if weight_dtype == "bfloat16":
        return to_bfloat16(w), np.ones(len(w), np.float32)
    return quantize_weight(w, per_channel)


class _Layout:
    """Where a quantized module's parameters are. ``names``: the float
    class's (name -> (storage index, rows)); ``entries``: per piece of a
    weight matrix (name, its rows or None, the key of the packed weight
    holding it, the rows there or None). A matrix may be split (the
    reset-before GRU's W_hh: the r and z rows, the n rows) or stacked with
    others (a layer's W_ih of both directions, one input projection)."""

    def __init__(self, names, entries, shapes, weight_dtype):
        self.names = names
        self.shapes = shapes              # each weight matrix's (N, K)
        self.int8 = weight_dtype == "int8"
        self.code = _quant.KIND_INT8 if self.int8 else _quant.KIND_BF16
        self.pieces, self.sources = {}, {}
        for name, name_rows, key, key_rows in entries:
            self.pieces.setdefault(name, []).append((key, key_rows))
            self.sources.setdefault(key, []).append((name, name_rows))
        # the state dict's names in order: PyTorch's, each int8 weight's scale after it
        self.order = []
        for name in names:
            self.order.append(name)
            if self.int8 and name in self.pieces:
                self.order.append(name + SCALE)
        self.known = frozenset(self.order)

    def read(self, weights, name):
        """(q, scale) of weight matrix ``name`` read back from the packed
        weights, in new arrays."""
        qs, scales = [], []
        for key, rows in self.pieces[name]:
            packed = weights[key]
            q = packed.weights()
            qs.append(q if rows is None else q[rows])
            scales.append(packed.scale if rows is None else packed.scale[rows])
        return np.concatenate(qs), np.concatenate(scales)

    def pack(self, named, keys):
        """key -> QWeight for each of ``keys``, from named[name] = (q, scale)."""
        packed = {}
        for key in keys:
            parts = [(named[name][0], named[name][1]) if rows is None else
                     (named[name][0][rows], named[name][1][rows])
                     for name, rows in self.sources[key]]
            q = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
            scale = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
            packed[key] = _quant.QWeight(np.ascontiguousarray(q),
                                         np.ascontiguousarray(scale, np.float32), self.code)
        return packed


class _Reduced:
    """A quantized module's parameter set, in place of _module.ParamSet and,
    like it, never changed once made: ``weights`` the kernels' packed weight
    matrices (``_quant.QWeight``: their only copy) by key, ``storages`` the
    float class's storages with those of the weight matrices dropped (None):
    the biases, read-only; ``views`` name -> the array of ``state_dict``, a
    weight read back from its panels when asked; ``cache`` what the kernels
    derive from the set (folded biases, the stack)."""
    __slots__ = ("version", "storages", "weights", "layout", "cache")

    def __init__(self, version, storages, weights, layout):
        self.version = version
        self.storages = tuple(None if storage is None else sealed(storage)
                              for storage in storages)
        self.weights = weights
        self.layout = layout
        self.cache = {}

    @property
    def views(self):
        return _Views(self)

    def array(self, name):
        """The value of ``name`` (KeyError if the module has none): a weight
        or its scales in a new array, else a read-only view of a storage."""
        layout = self.layout
        if name in layout.pieces:
            return layout.read(self.weights, name)[0]
        if name.endswith(SCALE) and name in layout.known and name not in layout.names:
            return layout.read(self.weights, name[:-len(SCALE)])[1]
        index, rows = layout.names[name]
        return self.storages[index] if rows is None else self.storages[index][rows]


class _Views(Mapping):
    """name -> read-only array of a _Reduced set, in state_dict order."""

    def __init__(self, params):
        self._params = params

    def __getitem__(self, name):
        # (sealed: a plain read-only array takes the flag back, and a write
        # into this copy then changed nothing, silently)
        return sealed(self._params.array(name))

    def __contains__(self, name):
        return name in self._params.layout.known

    def __iter__(self):
        return iter(self._params.layout.order)

    def __len__(self):
        return len(self._params.layout.order)


def _is_int8(value):
    """Whether a state dict's value is int8 (numpy or torch), without converting it."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and str(dtype) in ("int8", "torch.int8")


class _ReducedWeights:
    """Weights held reduced: what QuantizedLinear and the quantized layers
    and cells change in their float class's parameter storage
    (fastrnn._module.Module). The float class's constructor makes float32
    parameters; ``_reduce_parameters`` replaces them by a ``_Reduced`` set:
    the weight matrices packed for the kernels, int8 with their float32
    scales or bfloat16, and the float32 biases. No float32 weight matrix
    (nor gradient) is kept."""

    _reads_own_values = True   # fastrnn._own_values: a non-finite own value propagates

    def _refuse_training(self, what):
        raise TypeError(f"{type(self).__name__}: {what} is not available on a quantized "
                        f"({self._config['weight_dtype']}) model, which is for inference "
                        f"only; train the float32 model, then quantize it")

    def _reduce_parameters(self, entries):
        cfg = self._config
        floats = self._params
        matrices = {name for name, _, _, _ in entries}
        shapes = {name: floats.views[name].shape for name in matrices}
        layout = _Layout(dict(self._names), entries, shapes, cfg["weight_dtype"])
        dropped = {self._names[name][0] for name in matrices}
        storages = [None if i in dropped else storage
                    for i, storage in enumerate(floats.storages)]
        if filled_later():
            # no weights yet: every one is loaded (load_state_dict, strict) before any use
            weights = {}
        else:
            weights = layout.pack({name: _reduce(floats.views[name], cfg["weight_dtype"],
                                                 cfg["per_channel"])
                                   for name in matrices}, layout.sources)
        self._params = _Reduced(0, storages, weights, layout)
        # inference only: no gradients (a recurrent layer's are also held by kind)
        self._trainable = ()
        self._grads = MappingProxyType({})
        for attr in ("_dw_ih", "_dw_hh", "_db_ih", "_db_hh"):
            if attr in self.__dict__:
                setattr(self, attr, None)

    def __getattr__(self, name):
        params = self.__dict__.get("_params")
        if isinstance(params, _Reduced) and name in params.layout.known:
            return params.views[name]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        params = self.__dict__.get("_params")
        if isinstance(params, _Reduced) and name in params.layout.known:
            self.load_state_dict({name: value}, strict=False)
            return
        super().__setattr__(name, value)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The parameters in new arrays, under PyTorch's names and in its
        order: the weights as the kernels hold them, int8 (each followed by
        its float32 scales, one per row, ``<name>_scale``) or bfloat16 bit
        patterns (uint16); the biases float32. ``load_state_dict`` takes
        this form back exactly, and float weights (quantizing them)."""
        params = self._params
        layout = params.layout
        state = {}
        for name in layout.names:
            if name in layout.pieces:
                q, scale = layout.read(params.weights, name)
                state[name] = q
                if layout.int8:
                    state[name + SCALE] = scale
            else:
                state[name] = params.array(name).copy()
        return state

    def _expected_keys(self, given):
        """The names a state dict of the keys ``given`` must hold: every
        parameter, and the scales of the int8 weights given as int8 (or
        given with a scale)."""
        layout = self._params.layout
        keys = []
        for name in layout.names:
            keys.append(name)
            if layout.int8 and name in layout.pieces and (
                    name + SCALE in given or (name in given and _is_int8(given[name]))):
                keys.append(name + SCALE)
        return keys

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike],
                        strict: bool = True) -> LoadResult:
        """Load parameters from a mapping of name to array.

        A weight is taken either as ``state_dict`` gives it (int8 with its
        ``<name>_scale``: float scales of shape (rows,), finite and >= 0,
        equal along a tensor when ``per_channel`` is False, the int8 values
        in [-127, 127]; bfloat16 bit patterns as uint16) and kept exactly,
        or as floating-point weights, quantized (rounded to bfloat16) as
        ``fastrnn.quantize`` does. (bfloat16 subnormals become signed zeros,
        as that rounding makes them.) Biases are converted to float32. Every
        value is checked before anything changes; the new set replaces the
        old whole, as for the float classes.

        Raises
        ------
        TypeError
            If ``state_dict`` is not a mapping or a value is not a real array.
        ValueError
            On a missing or unexpected name (strict), a wrong shape or
            dtype, a non-finite value, an int8 weight without its scale (or
            a scale without an int8 weight), a negative or non-finite
            scale, or an int8 value of -128.
        """
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}: load_state_dict expects a mapping of name to array, "
                            f"got {type(state_dict).__name__}")
        strict = v.check_bool(f"{owner}.load_state_dict", "strict", strict)
        layout = self._params.layout
        expected = self._expected_keys(state_dict)
        known = set(expected)
        missing = [name for name in expected if name not in state_dict]
        unexpected = [key for key in state_dict if key not in known]
        if strict and (missing or unexpected):
            scales = self._config["weight_dtype"] != "int8" and any(
                key.endswith(SCALE) and key[:-len(SCALE)] in known for key in unexpected)
            hint = (f" (the state dict holds int8 weights with their scales; this model's "
                    f"weights are {self._config['weight_dtype']}: quantize the float32 model "
                    f"with dtype='int8' to load it)" if scales else "")
            raise ValueError(f"{owner}: load_state_dict: missing keys {missing}, "
                             f"unexpected keys {unexpected}; expected exactly {expected}{hint}")
        floats, named = {}, {}
        for name in layout.names:
            if name not in state_dict:
                continue
            if name in layout.pieces:
                named[name] = self._reduced_value(owner, name, state_dict)
                continue
            value = as_array(owner, f"state_dict[{name!r}]", state_dict[name])
            if value.dtype.kind not in "fiu":
                raise TypeError(f"{owner}: state_dict[{name!r}] must have a real numeric "
                                f"dtype, got {value.dtype}")
            index, rows = layout.names[name]
            target = self._params.storages[index]
            shape = target.shape if rows is None else target[rows].shape
            if value.shape != shape:
                raise ValueError(f"{owner}: expected {name} of shape {shape_str(shape)}, "
                                 f"got {shape_str(value.shape)}")
            floats[name] = _finite_float32(owner, name, value)
        for key in state_dict:
            if key.endswith(SCALE) and key in known and key[:-len(SCALE)] not in state_dict:
                raise ValueError(f"{owner}: {key} is given without {key[:-len(SCALE)]}; an "
                                 f"int8 weight and its scales load together")

        with self._grad_lock:
            current = latest_parameters(self)
            keys = [key for key, sources in layout.sources.items()
                    if any(name in named for name, _ in sources)]
            for key in keys:     # the other matrices sharing a packed weight, read back
                for name, _ in layout.sources[key]:
                    if name not in named:
                        named[name] = layout.read(current.weights, name)
            weights = dict(current.weights)
            weights.update(layout.pack(named, keys))
            storages = [None if storage is None else
                        (storage.copy() if floats else storage) for storage in current.storages]
            for name, value in floats.items():
                index, rows = layout.names[name]
                storages[index][slice(None) if rows is None else rows] = value
            set_parameters(self, _Reduced(current.version + 1, storages, weights, layout))
        return LoadResult(missing, unexpected)

    def _reduced_value(self, owner, name, state_dict):
        """(q, scale) of weight ``name`` of a state dict, checked: int8 with
        its scales, bfloat16 bits, or floats reduced here."""
        layout = self._params.layout
        cfg = self._config
        shape = layout.shapes[name]
        value = as_array(owner, f"state_dict[{name!r}]", state_dict[name])
        if value.dtype.kind not in "fiu":
            raise TypeError(f"{owner}: state_dict[{name!r}] must have a real numeric dtype, "
                            f"got {value.dtype}")
        if value.shape != shape:
            raise ValueError(f"{owner}: expected {name} of shape {shape_str(shape)}, got "
                             f"{shape_str(value.shape)}")
        scale_name = name + SCALE
        if layout.int8:
            if value.dtype == np.int8:
                if scale_name not in state_dict:
                    raise ValueError(f"{owner}: {name} is int8, so its scales {scale_name} "
                                     f"(float32 of shape ({shape[0]},)) must come with it")
                if (value == -128).any():
                    raise ValueError(f"{owner}: {name} holds the int8 value -128; expected "
                                     f"symmetric int8 weights, in [-127, 127]")
                scale = self._scale(owner, scale_name, state_dict[scale_name], shape[0])
                return np.ascontiguousarray(value), scale
            if value.dtype.kind != "f":
                hint = (" (a bfloat16 model's bit patterns: quantize the float32 model with "
                        "dtype='bfloat16' to load them)" if value.dtype == np.uint16 else "")
                raise ValueError(f"{owner}: expected {name} as int8 (with {scale_name}) or as "
                                 f"floating-point weights to quantize, got {value.dtype}{hint}")
            if scale_name in state_dict:
                raise ValueError(f"{owner}: {scale_name} is given with a {value.dtype} "
                                 f"{name}; scales go with int8 weights (floating-point ones "
                                 f"are quantized when loaded)")
            return _reduce(_finite_float32(owner, name, value), "int8", cfg["per_channel"])
        if value.dtype == np.uint16:
            # (in place where it can: a big model's load holds few temporaries)
            bits = np.array(value, np.uint16)
            exponent = bits & np.uint16(0x7f80)
            if (exponent == 0x7f80).any():
                raise ValueError(f"{owner}: {name} has non-finite values (bfloat16 NaN or "
                                 f"inf); expected finite weights")
            # subnormals to signed zero, as to_bfloat16 makes them
            np.bitwise_and(bits, np.uint16(0x8000), out=bits, where=exponent == 0)
            return bits, np.ones(shape[0], np.float32)
        if value.dtype.kind != "f":
            raise ValueError(f"{owner}: expected {name} as bfloat16 bit patterns (uint16) or "
                             f"as floating-point weights to round, got {value.dtype}")
        return _bfloat16_in_range(owner, name, _reduce(_finite_float32(owner, name, value),
                                                         "bfloat16", False))

    def _scale(self, owner, name, raw, rows):
        scale = as_array(owner, f"state_dict[{name!r}]", raw)
        if scale.dtype.kind != "f":
            raise ValueError(f"{owner}: expected {name} of float32, got {scale.dtype}")
        if scale.shape != (rows,):
            raise ValueError(f"{owner}: expected {name} of shape ({rows},), got "
                             f"{shape_str(scale.shape)}")
        with np.errstate(over="ignore"):
            scale = scale.astype(np.float32)
        bad = ~np.isfinite(scale) | (scale < 0)
        if bad.any():
            raise ValueError(f"{owner}: {name} must hold finite scales >= 0, got "
                             f"{float(scale[bad][0])} at row {int(np.argmax(bad))}")
        tiny = (scale > 0) & (scale < np.finfo(np.float32).tiny)
        if tiny.any():   # the kernels would flush it: the row would compute as zeros
            raise ValueError(f"{owner}: {name} has a subnormal scale, "
                             f"{scale[tiny][0]!s} at row {int(np.argmax(tiny))}, which "
                             f"the kernels flush to zero; give 0 for such a row, or "
                             f"scales of 1.1754944e-38 or more")
        if not self._config["per_channel"] and (scale != scale[0]).any():
            raise ValueError(f"{owner}: {name} holds different scales, but the layer has "
                             f"per_channel=False (one scale per weight tensor)")
        return scale


def _finite_float32(owner, name, value):
    with np.errstate(over="ignore"):  # overflow is reported just below
        value = value.astype(np.float32)
    if not np.isfinite(value).all():
        raise ValueError(f"{owner}: {name} has non-finite values (NaN or inf) after "
                         f"conversion to float32")
    return value


def _reduction_options(cfg):
    """The repr's (name, value) of a quantized module's options not at their
    defaults (int8 weights, per-channel scales)."""
    return ([("weight_dtype", cfg["weight_dtype"])] if cfg["weight_dtype"] != "int8" else []) \
        + ([("per_channel", False)] if cfg["weight_dtype"] == "int8" and not cfg["per_channel"]
           else [])


def _check_weight_dtype(owner, weight_dtype, argument="weight_dtype"):
    return v.check_choice(owner, argument, weight_dtype, WEIGHT_DTYPES)


class _Quantized(_ReducedWeights):
    """What the quantized layers and cells add to their float class."""

    def _init_quantized(self, weight_dtype, per_channel):
        owner = type(self).__name__
        cfg = self._config
        if cfg["dtype"] != np.float32:
            raise ValueError(f"{owner}: quantized layers compute in float32, got "
                             f"dtype={cfg['dtype'].name}")
        if cfg.get("proj_size"):
            raise ValueError(f"{owner}: proj_size={cfg['proj_size']}: the reduced-precision "
                             f"kernels have no projection")
        # built directly, as quantize() builds it: only what the kernels compute
        # (no learned initial state either: the call paths start from hx or zeros)
        _check_computed(owner, self)
        cfg["weight_dtype"] = _check_weight_dtype(owner, weight_dtype)
        cfg["per_channel"] = v.check_bool(owner, "per_channel", per_channel)
        self._reduce_parameters(self._entries())

    def _entries(self):
        """The packed weights of each layer (see _Layout): W_ih of both
        directions stacked, ("ih", layer); W_hh per direction, ("hh", layer,
        direction), the reset-before GRU's split into its r and z rows and
        its n rows, ("hn", layer, direction)."""
        ih, hh = self._storage_index[0], self._storage_index[1]
        H = self._config["hidden_size"]
        GH = self._gates * H
        reset_before = self._kernel_code == _forward.CELL_GRU_RESET_BEFORE
        entries = []
        for name, (index, rows) in self._names.items():
            if index in ih:
                entries.append((name, None, ("ih", ih.index(index)), rows))
            elif index in hh:
                key = (hh.index(index), rows.start // GH)
                if reset_before:
                    entries += [(name, slice(0, 2 * H), ("hh",) + key, None),
                                (name, slice(2 * H, GH), ("hn",) + key, None)]
                else:
                    entries.append((name, None, ("hh",) + key, None))
        return entries

    def _repr_options(self):
        return super()._repr_options() + _reduction_options(self._config)

    def _quantized(self, params):
        """Per layer (w_ih, w_hh per direction, w_hn per direction or None,
        bias_x, bias_h): QWeights and float32 biases."""
        return self._stack(params).layers

    def _stack(self, params):
        """The kernels' view of the packed weights (``_quant.QStack``), made
        once per parameter set and kept with it."""
        stack = params.cache.get("int8")
        if stack is None:
            layers = []
            packed = params.weights
            dirs = self._dirs
            reset_before = self._kernel_code == _forward.CELL_GRU_RESET_BEFORE
            _, _, b_ihs, b_hhs = self._weights(params)
            for k, (b_ih, b_hh) in enumerate(zip(b_ihs, b_hhs)):
                qw_hh = [packed["hh", k, d] for d in range(dirs)]
                qw_hn = [packed["hn", k, d] for d in range(dirs)] if reset_before else None
                if b_ih is None:
                    bias_x = bias_h = None
                elif self._kernel_code == _forward.CELL_GRU:
                    bias_x, bias_h = b_ih, b_hh
                else:
                    bias_x, bias_h = b_ih + b_hh, None
                layers.append((packed["ih", k], qw_hh, qw_hn, bias_x, bias_h))
            stack = _Stack(_quant.QStack(self._kernel_code, self._config["input_size"],
                                         self._config["hidden_size"], dirs, layers), layers)
            params.cache["int8"] = stack
        return stack

    def _unit_weights(self, params, bounds, B):
        """forward_units' part_weights for a split at ``bounds``: None where
        each part's columns lie on the packed weights' column groups
        (``_quant.units_fit``), else each part's rows packed on their own:
        another copy of the weights, kept with the parameter set for the split
        last asked (the bounds change with the thread count: one copy, not
        one per count)."""
        if _quant.units_fit(self._gates, self._config["hidden_size"], bounds, B):
            return None
        bounds = tuple(bounds)
        kept = params.cache.get("unit weights")
        if kept is None or kept[0] != bounds:
            kept = params.cache["unit weights"] = (
                bounds, _quant.unit_weights(self._stack(params).kernel, bounds))
        return kept[1]

    def _runner(self, params):
        """The lean path's runner for this parameter set, the thread count
        and the plan's tuning (built again when any changes)."""
        threads = _parallel.get_num_threads()   # once: the key's and the limits'
        key = ("qrunner",) + _plan._quant_tuning(threads)
        cached = params.cache.get("qrunner")
        if cached is None or cached[0] != key:
            cached = params.cache["qrunner"] = (key, _quant.QRunner(
                self._stack(params).kernel, bool(self._config.get("batch_first")),
                self._has_cell_state, *_plan.quantized_runner_limits(self, threads),
                _plan.QUANT_WINDOW_BYTES))
        return cached[1]

    def _qrun(self, params, x, T, B, batch_first, h_n, c_n, out, lengths):
        """Every layer on the reduced-precision kernels; x (T, B, D) or (B, T, D)
        C-contiguous float32; h_n, c_n (layers * dirs, B, H) hold the
        initial state and end as the final one."""
        steps = steps_run(T, B, lengths)
        if steps is not None:   # no sequence reaches the steps after it
            valid_steps(lambda x_run, out_run: self._qrun(
                params, x_run, steps, B, batch_first, h_n, c_n, out_run, lengths),
                x, steps, batch_first, out)
            return
        if lengths is not None:   # padding is never read, but the kernels refuse its NaN
            padding = padding_mask(T, B, batch_first, lengths)
            if not np.isfinite(x[padding]).all():   # (zeroed in a copy only then)
                x = x.copy()
                x[padding] = 0
        plan = _plan.quantized_plan(self, T, B, has_lengths=lengths is not None)
        kernel, ran = self._stack(params).kernel, 0
        # a carried state, a lower layer's output: an overflow in them propagates
        own = {"own_state": state_is_own(), "own_input": input_is_own()}
        if plan.units is not None and _plan.unit_split_allowed():
            # the hidden units split between the threads (the same bits)
            ran, outcome = _quant.forward_units(
                kernel, x=x.reshape(T * B, -1), h=h_n, c=c_n, out=out.reshape(T * B, -1),
                batch_first=batch_first, bounds=plan.units, window_bytes=plan.window_bytes,
                wait_ns=_plan.UNIT_SPLIT_WAIT_NS,
                part_weights=self._unit_weights(params, plan.units, B), **own)
            ran = _plan.unit_split_ran(ran)
        if not ran:
            outcome = _quant.forward(
                kernel, x=x.reshape(T * B, -1), T=T, batch_first=batch_first, h=h_n, c=c_n,
                out=out.reshape(T * B, -1), lengths=lengths, parts=plan.parts,
                direct=plan.direct, window_bytes=plan.window_bytes, **own)
        if outcome:
            raise ValueError(_not_finite(type(self).__name__, "input" if outcome == 1 else "hx",
                                         self._config["weight_dtype"]))

    def forward_train(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: a quantized model is for inference only (TypeError)."""
        self._refuse_training("forward_train")

    def _seq_train(self, x):
        self._refuse_training("training")


def _not_finite(owner, name, weight_dtype):
    """The message for a caller's input or hx the kernels refused."""
    beyond = (" or values beyond bfloat16's range (|x| >= 3.3961e+38 rounds to inf)"
              if weight_dtype == "bfloat16" else "")
    return (f"{owner}: {name} has non-finite values (NaN or inf, in float32: a float64 "
            f"value beyond 3.4028235e+38 overflows){beyond}; {weight_dtype} inference needs "
            f"finite values")


def _plain_state(hx, shape, full_shape, lstm):
    """(h, c) for a plain call: fresh float32 zeros of full_shape for hx None,
    else copies (reshaped to full_shape) of hx's float32 ndarrays of exactly
    ``shape``; None for anything else (the general checks then report it).
    c is None unless lstm."""
    if hx is None:
        return (np.zeros(full_shape, np.float32),
                np.zeros(full_shape, np.float32) if lstm else None)
    given = hx if lstm and type(hx) is tuple and len(hx) == 2 else (hx,)
    if len(given) != (2 if lstm else 1) or not all(
            type(a) is np.ndarray and a.dtype == np.float32 and a.shape == shape
            for a in given):
        return None
    return (given[0].reshape(full_shape).copy(),
            given[1].reshape(full_shape).copy() if lstm else None)


class _QuantizedLayer(_Quantized):

    def __call__(self, x: ArrayLike,
                 hx: ArrayLike | tuple[ArrayLike | None, ArrayLike | None] | None = None,
                 lengths: ArrayLike | None = None, *, mask: ArrayLike | None = None,
                 zero_output_for_mask: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | tuple[np.ndarray, np.ndarray]]:
        if mask is not None:   # fastrnn.masking runs the layer with lengths
            return self._masked(x, hx, lengths, mask, zero_output_for_mask, train=False)
        if zero_output_for_mask is not False:   # (no mask: nothing to zero, but checked)
            v.check_bool(type(self).__name__, "zero_output_for_mask", zero_output_for_mask)
        params = call_parameters(self)   # one parameter set for the whole call
        if lengths is None:
            # the lean path of small calls (_quant.QRunner), then the plain call
            result = self._runner(params).run(x, hx)
            if result is None:
                result = self._plain_call(params, x, hx)
            if result is not None:
                return result
        call = self._prepare(params, x, hx, lengths)
        if call.B > 0:
            self._qrun(params, call.x, call.T, call.B, call.batch_first, call.h_n, call.c_n,
                       call.out, call.lengths)
        return self._results(call)

    def _plain_call(self, params, x, hx):
        """The common call in a few steps (the general checks cost ~3 us, as
        much as a batch-1 step's kernels): a C-contiguous float32 ndarray of
        shape (T, B, D) or (B, T, D), hx None or float32 ndarrays of the full
        state shapes (copied: the caller's stay as they are), no learned
        initial state. Anything else: None, and the general path checks and
        reports it."""
        cfg = self._config
        if (type(x) is not np.ndarray or x.dtype != np.float32 or x.ndim != 3
                or not x.flags.c_contiguous or x.shape[2] != cfg["input_size"]):
            return None
        batch_first = cfg["batch_first"]
        B, T = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
        if T == 0 or B == 0 or B > v.BLAS_INT_MAX:
            return None
        rows, H = cfg["num_layers"] * self._dirs, cfg["hidden_size"]
        lstm = self._has_cell_state
        state = _plain_state(hx, (rows, B, H), (rows, B, H), lstm)
        if state is None:
            return None
        h_n, c_n = state
        out = np.empty((B, T, self._dirs * H) if batch_first else (T, B, self._dirs * H),
                       np.float32)
        self._qrun(params, x, T, B, batch_first, h_n, c_n, out, None)
        return (out, (h_n, c_n)) if lstm else (out, h_n)


class _QuantizedCell(_Quantized):

    def __call__(self, x: ArrayLike,
                 hx: ArrayLike | tuple[ArrayLike | None, ArrayLike | None] | None = None
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        params = call_parameters(self)
        result = self._runner(params).step(x, hx)   # the lean path of a plain step
        if result is not None:
            return result
        plain = self._plain_arguments(x, hx)
        x, B, batched, h, c = plain if plain is not None else self._prepare(params, x, hx)
        if B > 0:   # one step: h, c become the new state
            self._qrun(params, x[None], 1, B, False, h[None], None if c is None else c[None],
                       np.empty((1, B, self._config["hidden_size"]), np.float32), None)
        return self._results(h, c, batched)

    def _plain_arguments(self, x, hx):
        """_prepare's result for the common call in a few steps (the streaming
        call: a float32 ndarray frame (D,) or C-contiguous (B, D), hx None or
        float32 ndarrays of the state's shape, copied), or None: the general
        path then checks and reports everything."""
        cfg = self._config
        D, H = cfg["input_size"], cfg["hidden_size"]
        if (type(x) is not np.ndarray or x.dtype != np.float32 or not 1 <= x.ndim <= 2
                or not x.flags.c_contiguous or x.shape[-1] != D):
            return None
        batched = x.ndim == 2
        B = x.shape[0] if batched else 1
        if B == 0 or B > v.BLAS_INT_MAX:
            return None
        state = _plain_state(hx, (B, H) if batched else (H,), (B, H), self._has_cell_state)
        return None if state is None else (x.reshape(B, D), B, batched, *state)


_QUANT_DOC = """

    Reduced-precision inference (made by ``fastrnn.quantize``; see
    fastrnn.quantized): the float32 class's call, with the products in
    int8 or bfloat16, and its parameters held reduced: the weights int8
    with a float32 scale per row (``state_dict``: ``<name>`` int8 and
    ``<name>_scale``), or bfloat16 (uint16 bit patterns); the biases
    float32. Extra keyword-only parameters: ``weight_dtype`` ('int8' or
    'bfloat16') and ``per_channel`` (int8: bool, default True: a weight
    scale per output row; False: per weight tensor). Inference only."""


# a reduced weight's bytes per float32 weight's (an unknown weight_dtype:
# the float guard, then its own refusal)
def _weight_fraction(weight_dtype):
    return {"int8": 0.25, "bfloat16": 0.5}.get(weight_dtype) \
        if isinstance(weight_dtype, str) else None


def _check_size(owner, name, value, weight_dtype):
    """Refuse an input or hidden size past _quant.MAX_K before any allocation,
    saying whose bound it is (a bad weight_dtype is reported first)."""
    if not (isinstance(value, numbers.Integral) and value > _quant.MAX_K):
        return
    if _check_weight_dtype(owner, weight_dtype) == "bfloat16":
        reason = "(the bound of int8's int32 sums, which the bfloat16 kernels share)"
    else:
        reason = "for int8 products (int32 sums)"
    raise ValueError(f"{owner}: {name} must be at most {_quant.MAX_K} {reason}, got {value}")


def _quantized_class(base, mixin):
    def __init__(self, *args, weight_dtype="int8", per_channel=True, **kwargs):
        # sizes past the int32 sums' range are refused before any allocation
        try:
            sizes = inspect.signature(base).bind(*args, **kwargs).arguments
        except TypeError:
            sizes = {}    # the float class's constructor reports it
        for size in ("input_size", "hidden_size"):
            _check_size(name, size, sizes.get(size), weight_dtype)
        with weights_reduced(_weight_fraction(weight_dtype)):
            base.__init__(self, *args, **kwargs)
        self._init_quantized(weight_dtype, per_channel)

    name = "Quantized" + base.__name__
    cls = type(name, (mixin, base), {"__init__": __init__, "__module__": __name__,
                                     "__qualname__": name,
                                     "__doc__": (base.__doc__ or "") + _QUANT_DOC})
    # the float class's arguments and the two of quantization, by name (model
    # files check a layer's arguments against this signature)
    signature = inspect.signature(base)
    cls.__signature__ = signature.replace(parameters=list(signature.parameters.values()) + [
        inspect.Parameter("weight_dtype", inspect.Parameter.KEYWORD_ONLY, default="int8"),
        inspect.Parameter("per_channel", inspect.Parameter.KEYWORD_ONLY, default=True)])
    return cls


QuantizedRNN = _quantized_class(RNN, _QuantizedLayer)
QuantizedGRU = _quantized_class(GRU, _QuantizedLayer)
QuantizedLSTM = _quantized_class(LSTM, _QuantizedLayer)
QuantizedRNNCell = _quantized_class(RNNCell, _QuantizedCell)
QuantizedGRUCell = _quantized_class(GRUCell, _QuantizedCell)
QuantizedLSTMCell = _quantized_class(LSTMCell, _QuantizedCell)


class QuantizedLinear(_ReducedWeights, Linear):
    """``Linear`` with int8 or bfloat16 weights (made by ``fastrnn.quantize``):
    int8 ``y = dequant(q(x) . q(W)^T) + b``, every row of x quantized with
    its own scale, the weight per output row (``per_channel``) or as one
    tensor; bfloat16 ``y = bf16(x) . bf16(W)^T + b``. It holds ``weight``
    only reduced (``state_dict``: int8 and ``weight_scale``, or uint16
    bfloat16 bits; see fastrnn.quantized) and ``bias`` in float32.
    Inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = "float32", seed: Any = None, *, weight_dtype: str = "int8",
                 per_channel: bool = True) -> None:
        _check_size("QuantizedLinear", "in_features", in_features, weight_dtype)
        with weights_reduced(_weight_fraction(weight_dtype)):
            super().__init__(in_features, out_features, bias, dtype, seed)
        cfg = self._config
        if cfg["dtype"] != np.float32:
            raise ValueError(f"QuantizedLinear: quantized layers compute in float32, got "
                             f"dtype={cfg['dtype'].name}")
        cfg["weight_dtype"] = _check_weight_dtype("QuantizedLinear", weight_dtype)
        cfg["per_channel"] = v.check_bool("QuantizedLinear", "per_channel", per_channel)
        self._reduce_parameters([("weight", None, "weight", None)])

    def __repr__(self):
        cfg = self._config
        extra = "" if cfg["bias"] else ", bias=False"
        extra += "".join(f", {key}={value!r}" for key, value in _reduction_options(cfg))
        return f"QuantizedLinear({cfg['in_features']}, {cfg['out_features']}{extra})"

    def _qweight(self, params):
        packed = params.cache.get("int8")
        if packed is None:
            packed = params.cache["int8"] = (params.weights["weight"], params.views.get("bias"))
        return packed

    def __call__(self, x: ArrayLike) -> np.ndarray:
        x = self._check(x)
        params = call_parameters(self)
        w, bias = self._qweight(params)
        rows = x.reshape(-1, x.shape[-1])
        y = np.empty((rows.shape[0], w.N), np.float32)
        parts = _plan.split(1, rows.shape[0], rows.shape[0] * w.N * w.K // 4)
        if not _quant.project(x=np.ascontiguousarray(rows), w_ih=w, bias_x=bias, gx=y,
                              parts=_plan.halves(rows.shape[0], parts),
                              own_input=input_is_own()):
            raise ValueError(_not_finite("QuantizedLinear", "input",
                                         self._config["weight_dtype"]))
        return y.reshape(x.shape[:-1] + (w.N,))

    _seq_infer = __call__

    def _seq_train(self, x):
        self._refuse_training("training")


_QUANTIZED = {RNN: QuantizedRNN, GRU: QuantizedGRU, LSTM: QuantizedLSTM,
              RNNCell: QuantizedRNNCell, GRUCell: QuantizedGRUCell,
              LSTMCell: QuantizedLSTMCell, Linear: QuantizedLinear}
QUANTIZED_CLASSES = tuple(_QUANTIZED.values())


# the configuration the reduced-precision kernels compute; any other option
# a layer has must be off (None, False or 0), at the value the kernels
# compute, or act in training only, or it is refused by name (the kernels
# would silently compute without it)
_COMPUTED_OPTIONS = {"input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "dropout", "bidirectional", "dtype", "reset_after",
                     "in_features", "out_features"}
# options computed at these values only (an RNN's other nonlinearities, such
# as "softsign" or ["relu", "tanh"], are gate options the kernels lack)
_COMPUTED_VALUES = {"activation": ("tanh",), "recurrent_activation": ("sigmoid",),
                    "nonlinearity": ("tanh", "relu")}
_TRAINING_ONLY_OPTIONS = {"input_dropout", "recurrent_dropout", "weight_dropout"}
# the gate options: at their defaults when the cell runs the plain gates
_GATE_KEYS = {"activation", "recurrent_activation", "cell_activation", "clip", "input_forget",
              "peepholes"}


def _check_computed(owner, module):
    """Refuse a module with an option the reduced-precision kernels do not
    compute: every option must be one they compute, or off; the gate
    options and zoneout count as off when the cell runs without them (an
    explicit default, such as cell_activation='tanh' or zoneout=(0, 0),
    passes)."""
    plain_gates = getattr(module, "_option_rows", None) is None
    no_zoneout = getattr(module, "_zoneout", None) is None
    for key, value in module._config.items():
        off = value is None or value is False or (isinstance(value, (int, float))
                                                  and value == 0)
        if (plain_gates and key in _GATE_KEYS) or (no_zoneout and key == "zoneout"):
            continue
        if not (key in _COMPUTED_OPTIONS or off or key in _TRAINING_ONLY_OPTIONS
                or (key in _COMPUTED_VALUES and isinstance(value, str)
                    and value in _COMPUTED_VALUES[key])):
            raise ValueError(f"{owner}: the {type(module).__name__} has {key}={value!r}, "
                             f"which the reduced-precision kernels do not compute")


def _quantize_module(owner, module, dtype, per_channel):
    cls = _QUANTIZED.get(type(module))
    if isinstance(module, QUANTIZED_CLASSES):
        raise TypeError(f"{owner}: the {type(module).__name__} is quantized already; "
                        f"quantize the float32 model")
    float_base = next((base for base in _QUANTIZED if isinstance(module, base)), None)
    if cls is None and float_base is not None:
        raise TypeError(f"{owner}: cannot quantize a {type(module).__name__}, a subclass of "
                        f"{float_base.__name__}: quantize takes fastrnn's classes themselves (a "
                        f"subclass may compute otherwise); quantize a {float_base.__name__} "
                        f"holding its weights (load_state_dict)")
    if cls is None:
        torch = type(module).__module__.split(".")[0] == "torch"
        hint = ("; a PyTorch module converts with fastrnn.from_torch first (which also takes "
                "torch's quantize_dynamic modules)" if torch else "")
        raise TypeError(f"{owner}: cannot quantize a {v.qualified_name(module)}; "
                        f"expected a fastrnn RNN, GRU, LSTM, RNNCell, GRUCell, LSTMCell, Linear "
                        f"or a Sequential of them{hint}")
    config = {k: (val.name if isinstance(val, np.dtype) else val)
              for k, val in module._config.items()}
    _check_computed(owner, module)
    if config["dtype"] != "float32":
        raise ValueError(f"{owner}: quantize needs a float32 model, got a {config['dtype']} "
                         f"{type(module).__name__}")
    state = module.state_dict()
    for name, value in state.items():   # (named here: the new layer's load does not know whose)
        if not np.isfinite(value).all():
            raise ValueError(f"{owner}: {type(module).__name__}'s {name} has non-finite "
                             f"values (NaN or inf), which cannot be quantized (training "
                             f"diverged?)")
    with parameters_filled_later():   # (no initial values drawn: the next line loads them)
        quantized = cls(**config, weight_dtype=dtype, per_channel=per_channel)
    quantized.load_state_dict(state)
    return quantized


def quantize(model: Any, dtype: str = "int8", per_channel: bool = True) -> Any:
    """A copy of a float32 model for reduced-precision inference.

    Parameters
    ----------
    model : RNN, GRU, LSTM, RNNCell, GRUCell, LSTMCell, Linear or Sequential
        A float32 model. In a ``Sequential`` every recurrent layer (inside
        ``Reversed`` or ``Stateful`` too: new wrappers with the same options,
        a ``Stateful`` starting from the initial state) and ``Linear`` is
        quantized; an ``Embedding`` is copied (float32, as it was); the layers
        without weights (Dropout, LastStep, activations, ...) are shared with
        the original, as ``model[1:]`` shares them. A model with
        a layer quantized already is refused (quantize the float32 one).
    dtype : {'int8', 'bfloat16'}, default 'int8'
        The weights' type. int8: symmetric, in [-127, 127]; the products run
        in int8 with int32 sums, activations quantized per row at every use.
        bfloat16: weights and activations rounded to bfloat16, products
        summed in float32 (see fastrnn.quantized).
    per_channel : bool, default True
        int8: a weight scale per output row (per gate unit); False: one per
        weight tensor (each of PyTorch's parameters), as PyTorch's default.

    Returns
    -------
    QuantizedRNN, QuantizedGRU, QuantizedLSTM, QuantizedRNNCell, QuantizedGRUCell, QuantizedLSTMCell, QuantizedLinear or Sequential
        A new model, with the same call API, holding the weights reduced
        (int8 with a float32 scale per row, or bfloat16) and the biases in
        float32, not the float32 weights: a quarter or half of their bytes.
        ``state_dict``, ``fastrnn.save`` and pickling carry those reduced
        weights and the quantization settings (see fastrnn.quantized). The
        float model is not changed.

    Raises
    ------
    TypeError
        If the model is not one of the above, or on training the result
        (``forward_train``, ``fit``).
    ValueError
        On an unknown dtype, a float64 model, an option the reduced kernels
        do not compute (named), sizes past the int32 sums' range (input or
        hidden size above 65536; bfloat16 too), or (bfloat16) a weight
        beyond bfloat16's range.

    Examples
    --------
    >>> lstm = fastrnn.LSTM(16, 32, batch_first=True, seed=0)
    >>> q = fastrnn.quantize(lstm)                 # int8, per-channel scales
    >>> half = fastrnn.quantize(lstm, dtype="bfloat16")
    >>> out, (h_n, c_n) = q(np.random.rand(4, 50, 16).astype(np.float32))
    """
    from fastrnn.model import Sequential
    dtype = _check_weight_dtype("quantize", dtype, "dtype")
    per_channel = v.check_bool("quantize", "per_channel", per_channel)
    if isinstance(model, Sequential):
        with holding(model._owners()):   # every layer's weights of one moment
            layers = _quantize_layers(model, dtype, per_channel)
        if not any(isinstance(_recurrent(layer), QUANTIZED_CLASSES) for layer in layers):
            raise TypeError("quantize: the Sequential has no layer to quantize (RNN, GRU, "
                            "LSTM or Linear)")
        return Sequential(layers)
    return _quantize_wrapped("quantize", model, dtype, per_channel)


def _quantize_layers(model, dtype, per_channel):
    """quantize's layers of a Sequential: its own where nothing quantizes."""
    layers = []
    for i, layer in enumerate(model.layers):
        if isinstance(_recurrent(layer), QUANTIZED_CLASSES):
            raise TypeError(f"quantize: layer {i} of the Sequential ({layer!r}) is "
                            f"quantized already; quantize the float32 model")
        if type(_recurrent(layer)) in _QUANTIZED:
            layers.append(_quantize_wrapped(f"quantize: layer {i}", layer, dtype, per_channel))
        elif isinstance(layer, Module) and layer._names:
            # a layer with weights it keeps in float (an Embedding): a copy, so
            # that training or loading either model leaves the other as it was
            layers.append(copy.deepcopy(layer))
        else:
            layers.append(layer)
    return layers


def _quantize_wrapped(owner, layer, dtype, per_channel):
    """The quantized copy of a layer, in new wrappers like its own (Reversed,
    Stateful: their options kept; a Stateful's carried state is not, the
    copy starts from the initial state)."""
    if not isinstance(layer, _Wrapper):
        return _quantize_module(owner, layer, dtype, per_channel)
    inner = _quantize_wrapped(owner, layer.layer, dtype, per_channel)
    return type(layer)(inner, **layer._wrapper_config())


# --- PyTorch's dynamically quantized modules ----------------------------------------------

_TORCH_DYNAMIC = {"LSTM": QuantizedLSTM, "GRU": QuantizedGRU, "RNNCell": QuantizedRNNCell,
                  "GRUCell": QuantizedGRUCell, "LSTMCell": QuantizedLSTMCell,
                  "Linear": QuantizedLinear}
TORCH_DYNAMIC_MODULE = "torch.ao.nn.quantized.dynamic"


def is_torch_dynamic(module):
    """Whether module is one of torch.ao.nn.quantized.dynamic's modules."""
    return type(module).__module__.startswith(TORCH_DYNAMIC_MODULE)


def _torch_weight(torch, name, tensor):
    """(int8 weights, float32 scale per row, per_channel) of one of
    PyTorch's quantized weights; its -128s become -127 (fastrnn's int8 is
    symmetric)."""
    owner = "from_torch"
    if tensor.dtype != torch.qint8:
        raise ValueError(f"{owner}: {name} is {tensor.dtype}; fastrnn imports int8 dynamic "
                         f"quantization (dtype=torch.qint8) only")
    scheme = tensor.qscheme()
    if scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
        if tensor.q_per_channel_axis() != 0:
            raise ValueError(f"{owner}: {name} is quantized along axis "
                             f"{tensor.q_per_channel_axis()}; expected per output row (axis 0)")
        scales = tensor.q_per_channel_scales().to(torch.float32).numpy()
        zero = tensor.q_per_channel_zero_points().numpy()
        per_channel = True
    elif scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        scales = np.full(tensor.shape[0], tensor.q_scale(), np.float32)
        zero = np.array([tensor.q_zero_point()])
        per_channel = False
    else:
        raise ValueError(f"{owner}: {name} has the quantization scheme {scheme}; expected "
                         f"per tensor or per channel")
    if np.any(zero != 0):
        raise ValueError(f"{owner}: {name} has a non-zero zero point; fastrnn's int8 weights "
                         f"are symmetric (zero point 0, PyTorch's default for qint8 weights)")
    q = np.clip(tensor.int_repr().numpy(), -127, 127).astype(np.int8)
    return q, np.ascontiguousarray(scales, np.float32), per_channel


def from_torch_dynamic(module):
    """The quantized fastrnn module of one of PyTorch's dynamically quantized
    modules (torch.ao.quantization.quantize_dynamic with dtype=torch.qint8):
    LSTM, GRU, RNNCell, GRUCell, LSTMCell or Linear. Its int8 weights and
    scales are PyTorch's (a weight of -128, which PyTorch's [-128, 127]
    allows, becomes -127); its float32 biases too. What differs at run time:
    PyTorch quantizes a product's whole input with one asymmetric uint8
    scale (7 bits with reduce_range, as on x86), fastrnn each row
    symmetrically in 8 bits (see this module's docstring)."""
    import torch
    name = type(module).__name__
    cls = _TORCH_DYNAMIC.get(name)
    if cls is None:
        raise TypeError(f"from_torch: expected one of {TORCH_DYNAMIC_MODULE}'s LSTM, GRU, "
                        f"RNNCell, GRUCell, LSTMCell or Linear, got {name}")
    packed = getattr(module, "_packed_params", None)    # Linear's
    dtype = (getattr(module, "dtype", None) if name in ("LSTM", "GRU")
             else getattr(module, "weight_dtype", getattr(packed, "dtype", None)))
    if dtype != torch.qint8:
        raise ValueError(f"from_torch: {name} was quantized to {dtype}; fastrnn imports int8 "
                         f"dynamic quantization (dtype=torch.qint8) only")
    if name == "Linear":
        weight, scale, per_channel = _torch_weight(torch, "Linear.weight", module.weight())
        bias = module.bias()
        result = QuantizedLinear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                 per_channel=per_channel)
        state = {"weight": weight, "weight" + SCALE: scale}
        if bias is not None:
            state["bias"] = bias.detach().to(torch.float32).numpy()
        result.load_state_dict(state)
        return result
    weights = module.get_weight()
    biases = module.get_bias()
    state, schemes = {}, set()
    for key, tensor in weights.items():
        state[key], state[key + SCALE], per_channel = _torch_weight(torch, f"{name}.{key}",
                                                                    tensor)
        schemes.add(per_channel)
    if len(schemes) != 1:
        raise ValueError(f"from_torch: {name} mixes per-tensor and per-channel weights; "
                         f"fastrnn quantizes a layer one way")
    for key, tensor in biases.items():
        if tensor is not None:
            state[key] = tensor.detach().to(torch.float32).numpy()
    kwargs = {"bias": bool(module.bias), "per_channel": schemes.pop()}
    if name == "RNNCell":
        kwargs["nonlinearity"] = module.nonlinearity
    if name in ("LSTM", "GRU"):
        # PyTorch's quantized LSTM keeps no proj_size (nor W_hr): W_hh's width tells
        width = tuple(weights["weight_hh_l0"].shape)[1]
        if getattr(module, "proj_size", 0) or width != module.hidden_size:
            raise ValueError(f"from_torch: {name} was made from an LSTM with proj_size "
                             f"(weight_hh_l0 is {width} wide, hidden_size {module.hidden_size}); "
                             f"fastrnn's quantized layers have no projection (import the float "
                             f"module)")
        kwargs.update(num_layers=module.num_layers, batch_first=bool(module.batch_first),
                      dropout=float(module.dropout), bidirectional=bool(module.bidirectional))
    result = cls(module.input_size, module.hidden_size, **kwargs)
    result.load_state_dict(state)
    return result
