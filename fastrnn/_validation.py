"""Argument and array checks shared by every public class.

All user-facing error messages are made here or in the classes; the kernels
check nothing. Messages name the class, the argument, what was expected and
what was got.
"""
import math
import numbers
import os
import reprlib

import numpy as np

# BLAS dimensions are C ints. Module-level so the tests can lower it to reach
# the code paths that split or re-lay work for huge inputs.
BLAS_INT_MAX = 2**31 - 1

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def qualified_name(obj):
    """obj's class with its module (torch.nn.modules.rnn.LSTM, not LSTM), for
    a message where another library's class of the same name may stand."""
    where = type(obj).__module__
    return f"{'' if where == 'builtins' else where + '.'}{type(obj).__qualname__}"


def int_str(value):
    """An int for a message: its digits, or for more than 40 of them how
    many there are (str() of an int of over 4300 digits raises a ValueError
    of its own)."""
    value = int(value)
    if abs(value) < 10**40:
        return str(value)
    digits = int(math.log10(abs(value))) + 1   # (exact but next to powers of ten)
    return f"{'a negative' if value < 0 else 'an'} int of about {digits} digits"


def bytes_text(n):
    """A size for a message: '1.50 GiB', '12 bytes'."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def check_int(owner, name, value, minimum=1):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {int_str(value)}")
    return int(value)


def check_choice(owner, name, value, choices):
    """A str among ``choices`` (a TypeError for another type, a ValueError
    for another str), each message listing the choices."""
    listed = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
    if not isinstance(value, str):
        # (a class given, np.int8: itself, not "type")
        got = (f"the class {value.__module__}.{value.__qualname__}" if isinstance(value, type) else
               f"{type(value).__name__} {reprlib.repr(value)}")
        raise TypeError(f"{owner}: {name} must be a str ({listed}), got {got}")
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be {listed}, got {value!r}")
    return value


def check_path(owner, name, value):
    """A file's name (str, bytes or os.PathLike): a file object is not taken
    (files are written through a temporary file renamed over the target,
    and read memory-mapped)."""
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise TypeError(f"{owner}: {name} must be a file's name (str, bytes or os.PathLike), "
                        f"got {type(value).__name__}")
    return value


def instance_or_name(kind, value, base, table):
    """``value`` itself if a ``base`` instance, else a new ``table[name]()``
    for a name (any case); "{kind} must be a fastrnn {kind} or one of ..."
    (a TypeError for another type, saying so of a class given for an
    instance; a ValueError for an unknown name)."""
    if isinstance(value, base):
        return value
    expected = f"{kind} must be a fastrnn {kind} or one of {sorted(table)}, got"
    if not isinstance(value, str):
        hint = (f" (the class {value.__name__}: pass {value.__name__}() or a name)"
                if isinstance(value, type) and issubclass(value, base) else "")
        raise TypeError(f"{expected} {type(value).__name__}{hint}")
    if value.lower() not in table:
        raise ValueError(f"{expected} {value!r}")
    return table[value.lower()]()


def check_bool(owner, name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_dropout(owner, value, name="dropout"):
    """A dropout probability in [0, 1); ``name`` the argument's name."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a float in [0, 1), got "
                        f"{type(value).__name__} {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{owner}: {name} must be in [0, 1), got {value}")
    return float(value)


def check_dtype(owner, dtype):
    """float32 or float64; None means float32 (PyTorch's default)."""
    if dtype is None:
        return np.dtype(np.float32)
    given = dtype
    if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        dtype = str(dtype).removeprefix("torch.")   # torch.float64, as ported code passes it
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    # `is None` first: numpy compares None equal to float64
    if dt is None or dt not in _FLOAT_DTYPES:
        raise ValueError(f"{owner}: dtype must be 'float32' or 'float64', got {given!r}")
    return dt


def check_seed(owner, seed):
    """None, a non-negative int or a numpy Generator -> a Generator."""
    if seed is None or isinstance(seed, np.random.Generator):
        return np.random.default_rng(seed)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{owner}: seed must be None, an int or a numpy.random.Generator, "
                        f"got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{owner}: seed must be >= 0, got {seed}")
    return np.random.default_rng(int(seed))


def is_torch_tensor(value):
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def to_numpy(owner, name, value):
    """Any array-like (numpy, torch tensor, nested lists) -> a real numeric ndarray.

    Does not copy when it need not; never returns bool, complex, object or
    string arrays.
    """
    if value is None:   # (np.asarray(None) is an object array: name it as what it is)
        raise TypeError(f"{owner}: expected {name} as an array, got None")
    value = as_array(owner, name, value)
    if value.dtype.kind not in "fiu":
        value = ml_dtypes_values(value)
        if value.dtype.kind not in "fiu":
            raise TypeError(f"{owner}: {name} must have a real numeric dtype, got "
                            f"{value.dtype}")
    return value


def ml_dtypes_values(value):
    """An array of one of ml_dtypes' numbers (bfloat16, float8_*, int4, ...:
    what JAX and TensorFlow hand out; numpy sees their dtypes as opaque) as
    float32 or int64, which hold every such value exactly; else value."""
    if getattr(value.dtype.type, "__module__", "").split(".")[0] != "ml_dtypes":
        return value
    name = value.dtype.name
    if name.startswith(("int", "uint")):
        return value.astype(np.int64)
    if name.startswith(("bfloat", "float")):
        return value.astype(np.float32)
    return value


def _unusual_tensor_values(owner, name, value):
    """The values of a torch tensor whose .numpy() failed: a lazily negated
    or conjugated view (x.conj().imag, x.conj()), a dtype numpy lacks (such
    as bfloat16); nested and non-strided (sparse, mkldnn) ones refused."""
    if getattr(value, "is_nested", False):   # (torch 1.13 on)
        raise TypeError(f"{owner}: {name} is a torch nested tensor; pass its "
                        f".to_padded_tensor(0.0) with lengths= instead")
    if str(value.layout) != "torch.strided":
        raise TypeError(f"{owner}: {name} is a torch tensor of layout {value.layout}; "
                        f"pass its .to_dense()")
    value = value.resolve_conj().resolve_neg()
    try:
        return value.numpy()
    except TypeError:   # a dtype numpy lacks: bfloat16, float8; complex32 refused
        # (.double() would drop its imaginary part)
        if value.is_complex():
            raise TypeError(f"{owner}: {name} must have a real numeric dtype, got "
                            f"{value.dtype}") from None
        return value.double().numpy()


def as_array(owner, name, value):
    """Any array-like (numpy, torch tensor, nested lists) -> an ndarray of
    whatever dtype it has (no copy when none is needed)."""
    if isinstance(value, np.ma.MaskedArray):   # its mask would be dropped without a word
        raise _masked_refused(owner, name, "is")
    if not isinstance(value, np.ndarray):
        if type(value).__name__ == "PackedSequence" and type(value).__module__.startswith(
                "torch"):
            raise TypeError(f"{owner}: {name} is a torch PackedSequence; pass the padded "
                            f"tensor (torch.nn.utils.rnn.pad_packed_sequence) with "
                            f"lengths= instead")
        if is_torch_tensor(value):
            if value.is_quantized:
                raise TypeError(f"{owner}: {name} is a quantized torch tensor ({value.dtype}), "
                                f"not the values it stands for: pass its .dequantize(), or "
                                f"import the quantized module with fastrnn.from_torch")
            if value.is_meta:
                raise TypeError(f"{owner}: {name} is a torch tensor on the meta device, "
                                f"which holds no values")
            value = value.detach().cpu()
            try:
                value = value.numpy()
            except (TypeError, RuntimeError):   # the rarer tensors, checked only then
                value = _unusual_tensor_values(owner, name, value)
        listed = isinstance(value, (list, tuple))
        if listed:
            value = _list_items(owner, name, value)
        try:
            value = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            nested = _nested_items(owner, name, value) if listed else None
            if nested is None:
                raise TypeError(f"{owner}: {name} must be array-like, got "
                                f"{type(value).__name__} that numpy cannot convert "
                                f"({exc})") from None
            value = as_array(owner, name, nested)
    if type(value) is not np.ndarray:
        # a subclass as a plain array: an np.matrix stays 2-D through reshape
        # (an unbatched call's hx reached the kernel so)
        value = np.asarray(value)
    return value


def _list_items(owner, name, items):
    """A list's (or tuple's) items as np.asarray may take them: its masked
    arrays refused as one is (np.asarray drops their masks without a
    word), its torch tensors converted as as_array converts one (np.asarray
    raises torch's own error on a tensor that requires grad). Only the
    outer list's items are looked at, by their type (a list of 200,000 rows
    costs a few ms): a tensor deeper in is converted when np.asarray fails
    (_nested_items)."""
    converted = None
    for k, item in enumerate(items):
        kind = type(item)
        if kind is list or kind is tuple or kind is float or kind is int or kind is np.ndarray:
            continue
        if isinstance(item, np.ma.MaskedArray):
            raise _masked_refused(owner, name, "holds")
        if is_torch_tensor(item):
            if converted is None:
                converted = list(items)
            converted[k] = as_array(owner, name, item)
    return items if converted is None else converted


def _nested_items(owner, name, items):
    """A list np.asarray refused, its nested lists and tensors converted
    one by one (a list of lists of tensors), or None if it holds none."""
    if not any(isinstance(item, (list, tuple)) or is_torch_tensor(item) for item in items):
        return None
    return [as_array(owner, name, item) if isinstance(item, (list, tuple)) or
            is_torch_tensor(item) else item for item in items]


def _masked_refused(owner, name, verb):
    return TypeError(f"{owner}: {name} {verb} a numpy masked array, whose mask fastrnn does not "
                     f"read; pass its .filled(value), and a mask or sample weights where the "
                     f"call takes them")


LEAN_COPY_MAX = 1 << 20   # elements plain_numbers converts for the lean paths


def plain_numbers(value, dtype):
    """An ndarray of real numbers as the lean paths take it (C-contiguous, of
    ``dtype``): a strided view (``x[:, t]`` of batch-first data) or another
    dtype converted as ``as_float_array`` would convert it, before the lean
    path, which refuses it (the general path then cost 15-20 us more than
    the 1-3 us call). Anything else unchanged (the general path checks it)."""
    if type(value) is not np.ndarray or (value.dtype is dtype and value.flags.c_contiguous):
        return value   # (checked first: the common call pays only this)
    # a large one goes to the general path as it is, which checks its sizes
    # before converting (a broadcast view of 2**31 rows was copied first: 48 GiB)
    if value.dtype.kind in "fiu" and value.size <= LEAN_COPY_MAX:
        return np.asarray(value, dtype=dtype, order="C")   # (0-D stays 0-D)
    return value


def as_float_array(owner, name, value, dtype, own_copy=False, check_shape=None):
    """A C-contiguous array of the layer's dtype (a copy only if needed, or
    always one of our own with ``own_copy``: never the caller's memory, which
    they may change later; a torch tensor's .numpy() shares it).
    ``check_shape(shape)`` runs before any conversion (a broadcast view of
    2**31 rows, refused for its batch size, was copied first: 48 GiB).

    np.asarray keeps the number of dimensions; np.ascontiguousarray would make
    a 0-D input 1-D.
    """
    values = to_numpy(owner, name, value)
    if check_shape is not None:
        check_shape(values.shape)
    arr = np.asarray(values, dtype=dtype, order="C")
    # the caller's memory unless converted here or built from a list: an
    # array-like's __array__ (xarray, pint) may hand out its own buffer
    if own_copy and (not arr.flags.owndata
                     or (arr is values and not isinstance(value, (list, tuple)))):
        arr = arr.copy()
    return arr


def state_arrays(owner, arg, value, names, expected, dtype, full_shape=None,
                 optional_parts=False):
    """Fresh C-contiguous arrays of ``dtype`` for a state argument.

    ``value`` is None (all zeros), one array (one name) or a tuple of
    ``len(names)`` arrays, each of shape ``expected``; they come back reshaped
    to ``full_shape``. With ``optional_parts`` a part may be None (zeros).
    ``expected`` and ``full_shape`` may be lists, a shape per name (an
    LSTM with a projection: h narrower than c).
    """
    full_shape = expected if full_shape is None else full_shape
    if isinstance(expected, list):   # a shape per name
        shapes = list(zip(expected, full_shape))
    else:
        shapes = [(expected, full_shape)] * len(names)

    def expected_text():   # for the messages only
        distinct = list(dict.fromkeys(shape for shape, _ in shapes))
        return (f"shape {shape_str(distinct[0])}" if len(distinct) == 1 else
                "shapes " + " and ".join(shape_str(shape) for shape, _ in shapes))

    if value is None:
        parts = (None,) * len(names)
    elif len(names) > 1:
        if not isinstance(value, (tuple, list)) or len(value) != len(names):
            got = (f"a {type(value).__name__} of {len(value)} item"
                   f"{'' if len(value) == 1 else 's'}" if isinstance(value, (tuple, list))
                   else type(value).__name__)
            raise TypeError(f"{owner}: {arg} must be a tuple ({', '.join(names)}) of arrays of "
                            f"{expected_text()}, got {got}")
        parts = value
    else:
        if isinstance(value, (tuple, list)):
            raise TypeError(f"{owner}: {arg} must be one array of {expected_text()}, "
                            f"got a {type(value).__name__}")
        parts = (value,)
    arrays = []
    for name, part, (shape, full) in zip(names, parts, shapes):
        if part is None and (value is None or optional_parts):
            arrays.append(np.zeros(full, dtype))
            continue
        arr = to_numpy(owner, name, part)
        if arr.shape != shape:
            raise ValueError(f"{owner}: expected {name} of shape {shape_str(shape)}, "
                             f"got {shape_str(arr.shape)}")
        # our own copy: the kernels update states in place
        arrays.append(np.array(arr.reshape(full), dtype=dtype, order="C"))
    return arrays


def check_lengths(owner, lengths, batch, steps):
    """lengths: B integers in [1, T] -> an int64 array of our own (a training
    tape keeps it until backprop, whatever the caller then writes into
    theirs)."""
    arr = to_numpy(owner, "lengths", lengths)
    if arr.size == 0 and arr.dtype.kind == "f":  # numpy makes [] float64
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{owner}: lengths must be integers, got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"{owner}: expected lengths of shape ({batch},), got {arr.shape}")
    if batch and (arr.min() < 1 or arr.max() > steps):
        raise ValueError(f"{owner}: lengths must lie in [1, {steps}] (the number of steps), "
                         f"got values from {arr.min()} to {arr.max()}")
    return np.array(arr, dtype=np.int64)


def shape_str(shape):
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
