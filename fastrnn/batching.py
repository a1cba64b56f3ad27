"""Batching for a Sequential: arrays, ragged sequences and iterables of batches.

``fit``, ``evaluate`` and ``predict`` take their data in three forms:

- arrays with the samples first: ``x`` (N, T, features) or (N, features),
  ``y`` (N, ...), optionally ``sample_weight`` (N,) or, for per-step
  targets, (N, T);
- ragged sequences: ``x`` a list of N arrays (T_i, features) of different
  lengths, with ``y`` an array (N, ...) of one target per sequence or, where
  the model's output has a step axis, one target per step: a list of N
  arrays (T_i, ...), or those padded into one array (N, max T_i, ...) (as
  ``pad`` pads them; the padding is dropped). Each batch is padded with
  zeros to its longest sequence and run with ``lengths``: no padded step
  reaches the state, the loss or the metrics;
- an iterable of batches (a generator, a list, any object with
  ``__iter__``): each item a tuple ``(x, y)`` or ``(x, y, sample_weight)``
  of arrays or ragged lists, for data larger than memory. ``predict`` also
  takes items that are ``x`` alone.

``pad`` pads sequences as ``fit`` does.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import namedtuple
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from fastrnn import _validation as v
from fastrnn._validation import shape_str

# Where fit's pass over arrays stopped when its last epoch ended inside it
# (steps_per_epoch): samples and batch size of the pass, its next batch, and
# the model's generator as it was before it drew the pass's order (None:
# not shuffled). A resumed run (initial_epoch > 0, the model loaded from a
# file saved then, or the same model) draws the same order and goes on.
FitPass = namedtuple("FitPass", "samples batch_size next start")

Batch = namedtuple("Batch", ["x", "y", "sample_weight", "lengths", "mask"])
Batch.__doc__ = """One batch as the model runs it: x (B, T, ...) padded if ragged, y (B, ...)
(padded per-step targets), sample_weight (B,) or (B, T) or None, lengths (B,) int64 or None
(every sequence full), mask (B, T) bool of the steps that count for per-step targets, or
None (all count)."""


def pad(sequences: Sequence[ArrayLike], dtype: DTypeLike | None = None
        ) -> tuple[np.ndarray, np.ndarray]:
    """Pad sequences of different lengths with zeros at their ends.

    Parameters
    ----------
    sequences : list of array-like of shape (T_i, ...)
        The trailing shapes must agree.
    dtype : dtype, optional
        Of the result; by default the sequences' common type (int64
        and float32 ones meet in float64). A value it cannot hold is
        refused (an integer out of its range, a fraction or
        NaN into integers, an integer a float type rounds, a float that
        overflows); floats rounded to a narrower float are not.

    Returns
    -------
    padded : ndarray of shape (N, max T_i, ...)
    lengths : ndarray of N int64

    Raises
    ------
    TypeError
        If ``sequences`` is not a list of arrays, or ``dtype`` not a real
        number or bool type.
    ValueError
        If it is empty, a sequence has no steps, the trailing shapes differ,
        or a value does not fit ``dtype``.

    Examples
    --------
    >>> padded, lengths = fastrnn.batching.pad([np.ones((3, 2)), np.ones((5, 2))])
    >>> padded.shape, lengths
    ((2, 5, 2), array([3, 5]))
    """
    if not isinstance(sequences, (list, tuple)):
        raise TypeError(f"pad: sequences must be a list of arrays, got "
                        f"{type(sequences).__name__}")
    arrays = [v.to_numpy("pad", f"sequences[{i}]", s) for i, s in enumerate(sequences)]
    if not arrays:
        raise ValueError("pad: got no sequences")
    for i, a in enumerate(arrays):
        if a.ndim == 0 or len(a) == 0:
            raise ValueError(f"pad: sequences[{i}] has shape {shape_str(a.shape)}; every "
                             f"sequence needs at least one step")
        if a.shape[1:] != arrays[0].shape[1:]:
            raise ValueError(f"pad: sequences[{i}] has shape {shape_str(a.shape)}, whose "
                             f"trailing axes differ from sequences[0]'s "
                             f"{shape_str(arrays[0].shape)}")
    lengths = np.array([len(a) for a in arrays], np.int64)
    if dtype is None:
        # the common type, checked as a given one: integers with floats (or
        # uint64 with int64) meet in float64, which rounds past 2**53
        dtype = np.result_type(*arrays)
        for i, a in enumerate(arrays):
            if a.dtype != dtype:
                _check_cast(a, dtype, f"sequences[{i}]", ", the sequences' common type,")
        return _pad(arrays, lengths, dtype), lengths
    given = dtype
    try:
        dtype = np.dtype(dtype)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or not (dtype.kind in "biuf" or _ml_float(dtype)):
        raise TypeError(f"pad: dtype must be a real number or bool type, got {given!r}")
    for i, a in enumerate(arrays):
        _check_cast(a, dtype, f"sequences[{i}]")
    return _pad(arrays, lengths, dtype), lengths


def _ml_float(dtype):
    """Whether dtype is one of ml_dtypes' float types (bfloat16, float8_*)."""
    return dtype.kind == "V" and dtype.type.__module__ == "ml_dtypes" and "float" in dtype.name


def _check_cast(a, dtype, name, why=""):
    """Refuse a value of ``a`` that ``dtype`` would change: an integer out
    of range (int8's 300 wraps to 44), a fraction or NaN into integers, an
    integer that floats round (an id from 2**24 on in float32: the
    neighbouring embedding row), a finite float that overflows to inf. A
    float rounded to a narrower float is what asking for it means. (Keras'
    pad_sequences casts silently.)"""
    floats = dtype.kind == "f" or _ml_float(dtype)
    with np.errstate(all="ignore"):
        cast = a.astype(dtype)
        if floats and a.dtype.kind == "f":
            bad = np.isinf(cast) & np.isfinite(a)
        elif floats:   # integers: compared as integers (in float64 2**53 + 1
                       # equals its rounding)
            bad = ~np.isfinite(cast) | (cast.astype(a.dtype) != a)
        else:
            bad = cast != a
    if bad.any():
        index = tuple(int(k) for k in np.argwhere(bad)[0])
        raise ValueError(f"pad: {name}{list(index)} is {a[index].item()!r}, which dtype "
                         f"{dtype}{why} cannot hold (it would become {cast[index].item()!r})")


def _pad(arrays, lengths, dtype):
    out = np.zeros((len(arrays), int(lengths.max())) + arrays[0].shape[1:], dtype)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return out


def _as_sequence_list(x, owner, name):
    """x as a list of arrays if it is ragged (a list or object array of
    sequences whose shapes differ), else None. Its items are taken as an
    array x is (``_validation.to_numpy``: a masked array refused by name,
    its mask would be dropped; a torch tensor converted as a layer converts
    it; real numbers only)."""
    if isinstance(x, np.ndarray):
        if x.dtype != object or x.ndim != 1:
            return None
        items = list(x)
    elif isinstance(x, (list, tuple)):
        items = list(x)
    else:
        return None
    if not items:
        return None
    arrays = []
    for i, item in enumerate(items):
        if isinstance(item, np.ma.MaskedArray) or v.is_torch_tensor(item):
            arrays.append(v.as_array(owner, f"{name}[{i}]", item))
            continue
        try:
            a = np.asarray(item)
        except ValueError:          # an item that is itself ragged: not a sequence list
            return None
        if a.dtype == object:
            return None
        arrays.append(a)
    if all(a.shape == arrays[0].shape for a in arrays):
        return None
    return [v.to_numpy(owner, f"{name}[{i}]", a) for i, a in enumerate(arrays)]


class ArrayData:
    """Data held in memory: arrays, or ragged lists of sequences.

    ``epoch`` gives an epoch's batches: a whole pass, or with ``steps`` per
    epoch the next batches of the current pass (Keras' rule, as
    ``IterableData`` continues its iterable), a new pass begun once one has
    ended; ``ended_short`` tells when an epoch met the pass's end first.

    Parameters
    ----------
    owner : str
        The method, for error messages ('Sequential.fit').
    model : Sequential
        Checks x as its layers take it.
    x, y, sample_weight
        See the module's description; y may be None (predict).
    names : (str, str, str)
        How the messages call x, y and sample_weight.
    """

    def __init__(self, owner, model, x, y=None, sample_weight=None,
                 names=("x", "y", "sample_weight")):
        self.owner = owner
        self.weights_dtype = np.dtype(model._dtype() or np.float32)
        x_name, y_name, w_name = names
        ragged = _as_sequence_list(x, owner, x_name)
        self.ragged = ragged is not None
        if self.ragged:
            self.x = self._check_sequences(model, ragged, x_name)
            self.lengths = np.array([len(a) for a in self.x], np.int64)
            if getattr(model.layers[0], "_takes_ids", False):
                # ids padded in their own type: in a float32 model's, an id
                # from 2**24 on became its neighbour's (2**24 + 1 -> 2**24)
                self.dtype = np.result_type(*self.x)
            else:
                self.dtype = model._dtype() or np.result_type(np.float32, *self.x)
            self.n = len(self.x)
        else:
            self.x = model._check_x(owner, x, x_name)
            self.n = len(self.x)
        self.y_ragged = False
        self.y = None
        if y is not None:
            y_list = _as_sequence_list(y, owner, y_name) if self.ragged else None
            if y_list is None:
                y = v.to_numpy(owner, y_name, y)
                if self.ragged and model._keeps_steps():
                    y_list = self._unpadded_step_targets(y, y_name)
            if y_list is not None:
                self.y = self._check_step_targets(y_list, y_name)
                self.y_ragged = True
            else:
                self.y = y
                if self.y.ndim == 0 or len(self.y) != self.n:
                    raise ValueError(f"Sequential: x and y must have the same number of "
                                     f"samples (first axis), got {self.n} samples in x and "
                                     f"y of shape {shape_str(self.y.shape)}")
        if self.n == 0:
            raise ValueError(f"{owner}: {x_name} has no samples")
        self.sample_weight = None
        if sample_weight is not None:
            self.sample_weight = self._check_weights(sample_weight, w_name)

    def _check_sequences(self, model, arrays, name):
        owner = self.owner
        features = model._input_features()
        if getattr(model.layers[0], "_takes_ids", False):   # [masks] an Embedding: (T_i,) ids
            for i, a in enumerate(arrays):
                if a.ndim != 1 or len(a) == 0:
                    raise ValueError(f"{owner}: expected {name} as a list of id sequences of "
                                     f"shape (T_i,) with T_i >= 1, got {name}[{i}] of shape "
                                     f"{shape_str(a.shape)}")
                model.layers[0]._ids(a, owner, f"{name}[{i}]")
            return arrays
        for i, a in enumerate(arrays):
            if a.ndim != 2 or len(a) == 0 or (features is not None and a.shape[1] != features):
                f = "features" if features is None else features
                raise ValueError(f"{owner}: expected {name} as a list of sequences of shape "
                                 f"(T_i, {f}) with T_i >= 1, got {name}[{i}] of shape "
                                 f"{shape_str(a.shape)}")
            if a.shape[1] != arrays[0].shape[1]:
                raise ValueError(f"{owner}: the sequences of {name} differ in features: "
                                 f"{name}[0] has {arrays[0].shape[1]}, {name}[{i}] has "
                                 f"{a.shape[1]}")
        if not model._takes_sequences():
            raise ValueError(f"{owner}: {name} is a list of sequences of different lengths, "
                             f"but the model has no recurrent layer or LastStep to take them")
        return arrays

    def _unpadded_step_targets(self, y, name):
        """Per-step targets padded into one array (N, T, ...) for ragged x
        (``pad``'s result), as the list of each sequence's own steps: their
        padded steps counted in the loss and the metrics (and trained on) as
        if they were data. None if y is not such an array."""
        if y.ndim < 2 or len(y) != self.n:
            return None
        longest = int(self.lengths.max())
        if y.shape[1] != longest:
            raise ValueError(f"{self.owner}: {name} of shape {shape_str(y.shape)} holds per-step "
                             f"targets (the model's output has a step axis) padded to "
                             f"{y.shape[1]} steps, but the longest sequence of x has {longest}; "
                             f"pass them padded to it, or as a list of N arrays (T_i, ...)")
        return [y[i, :length] for i, length in enumerate(self.lengths)]

    def _check_step_targets(self, arrays, name):
        owner = self.owner
        if len(arrays) != self.n:
            raise ValueError(f"Sequential: x and y must have the same number of samples, got "
                             f"{self.n} sequences in x and {len(arrays)} in {name}")
        for i, (a, length) in enumerate(zip(arrays, self.lengths)):
            if a.ndim == 0 or len(a) != length:
                raise ValueError(f"{owner}: {name}[{i}] has shape {shape_str(a.shape)}, but "
                                 f"x[{i}] has {length} steps (per-step targets need one per "
                                 f"step)")
            if a.shape[1:] != arrays[0].shape[1:]:
                raise ValueError(f"{owner}: the per-step targets of {name} differ in shape: "
                                 f"{name}[0] {shape_str(arrays[0].shape)}, {name}[{i}] "
                                 f"{shape_str(a.shape)}")
        return arrays

    def _check_weights(self, weights, name):
        owner = self.owner
        w = v.ml_dtypes_values(v.as_array(owner, name, weights))   # (bools weigh 0 or 1)
        if w.dtype.kind not in "biuf":
            raise TypeError(f"{owner}: {name} must hold numbers, got dtype {w.dtype}")
        w = w.astype(np.float64)
        if w.ndim == 2 and w.shape[1] == 1:
            w = w[:, 0]
        per_step = (not self.ragged and self.y is not None and self.y.ndim >= 2
                    and w.ndim == 2 and w.shape == self.y.shape[:2])
        if w.shape != (self.n,) and not per_step:
            steps = "" if self.ragged else " or (N, T) for per-step targets"
            raise ValueError(f"{owner}: expected {name} of shape ({self.n},){steps}, got "
                             f"{shape_str(w.shape)}")
        if not np.isfinite(w).all():
            raise ValueError(f"{owner}: {name} must be finite")
        dtype = self.weights_dtype
        if w.size and np.abs(w).max() > np.finfo(dtype).max:   # (the loss casts them to it)
            raise ValueError(f"{owner}: {name} holds {np.abs(w).max():g}, beyond {dtype.name}'s "
                             f"range (the model's dtype: at most {np.finfo(dtype).max:g})")
        return w

    def __len__(self):
        return self.n

    def split(self, n_val):
        """(training part, validation part): the last n_val samples held out."""
        cut = self.n - n_val
        return self._subset(slice(None, cut)), self._subset(slice(cut, None))

    def _subset(self, part):
        copy = object.__new__(ArrayData)
        copy.__dict__.update(self.__dict__)
        copy.x = self.x[part]
        if self.ragged:
            copy.lengths = self.lengths[part]
        if self.y is not None:
            copy.y = self.y[part]
        if self.sample_weight is not None:
            copy.sample_weight = self.sample_weight[part]
        copy.n = len(copy.x)
        return copy

    def take(self, index):
        """The Batch of the samples at ``index`` (an index array or a slice)."""
        sw = None if self.sample_weight is None else self.sample_weight[index]
        if not self.ragged:
            return Batch(self.x[index], None if self.y is None else self.y[index], sw,
                         None, None)
        if isinstance(index, slice):
            index = np.arange(self.n)[index]
        lengths = self.lengths[index]
        x = _pad([self.x[i] for i in index], lengths, self.dtype)
        full = lengths.min() == lengths.max()
        y = mask = None
        if self.y is not None:
            if self.y_ragged:
                y = _pad([self.y[i] for i in index], lengths, self.y[0].dtype)
                # a mask even when nothing is padded: a sample's weight then
                # counts once per step in every batch (a weighted metric gave
                # another value when the rows fell in batches of one length)
                mask = np.arange(x.shape[1])[None, :] < lengths[:, None]
            else:
                y = self.y[index]
        return Batch(x, y, sw, None if full else lengths, mask)

    _order = None         # the current pass's order (None: the samples in turn)
    _next = 0             # its next batch
    ended_short = False   # the last epoch met the pass's end before its steps

    def batches(self, batch_size, order=None, steps=None, first=0):
        """The batches in ``order`` (all samples in turn by default) from
        batch ``first`` on, at most ``steps`` of them."""
        count = -(-self.n // batch_size)
        if steps is not None:
            count = min(count, first + steps)
        for step in range(first, count):
            part = slice(step * batch_size, (step + 1) * batch_size)
            yield self.take(part if order is None else order[part])

    def resume(self, next_batch, order):
        """Go on with a pass an earlier fit left unfinished: its order (None:
        the samples in turn), and the batch its next epoch starts at."""
        self._order, self._next = order, next_batch

    def unfinished(self, batch_size):
        """The next batch of the current pass if an epoch stopped inside it
        (steps per epoch), else None."""
        return self._next if 0 < self._next < -(-self.n // batch_size) else None

    def epoch(self, batch_size, steps, new_order):
        """One epoch's Batches (see the class); ``new_order()`` gives a new
        pass's order."""
        per_pass = -(-self.n // batch_size)
        if steps is None or self._next == 0 or self._next >= per_pass:
            self._order, self._next = new_order(), 0
        first = self._next
        self._next = per_pass if steps is None else min(per_pass, first + steps)
        self.ended_short = steps is not None and self._next - first < steps
        return self.batches(batch_size, self._order, steps, first)


class IterableData:
    """Batches drawn from an iterable; see the module's description.

    With ``steps`` per epoch, the batches continue from where the last epoch
    stopped, and an iterable that starts over (``iter(data)`` a new
    iterator) is started again when it runs out. Without, each epoch is one
    pass over it. ``ran_out`` tells when a one-shot iterator (a generator)
    ran out.
    """

    def __init__(self, owner, model, source, name="x", targets=True):
        try:
            iterator = iter(source)
        except TypeError:
            raise TypeError(f"{owner}: {name} must be an array, a list of sequences or an "
                            f"iterable of batches, got {type(source).__name__}") from None
        self.owner, self.model, self.name, self.targets = owner, model, name, targets
        self.source = source
        self.one_shot = iterator is source
        self._iterator = iterator if self.one_shot else None
        self.ran_out = False
        try:
            self.length = len(source)
        except TypeError:
            self.length = None

    _pending = None   # the item a look-ahead drew (a one-shot iterator's)

    def batches(self, steps=None, from_start=False, look_ahead=False):
        """One epoch's Batches. ``from_start``: an iterable that starts over
        starts over now (each validation takes the same batches, as Keras'
        does). ``look_ahead``: after ``steps`` batches of a one-shot
        iterator, draw the next item (kept for the next call), so that
        ``ran_out`` tells now that no batch is left."""
        if from_start and not self.one_shot:
            self._iterator = None
        self.taken = 0
        if steps is None:
            iterator = self._iterator if self.one_shot else iter(self.source)
            count = 0
            for item in iterator:
                count += 1
                yield self._batch(item, count - 1)
            if count == 0 and self.one_shot:
                self.ran_out = True
            return
        fresh = False
        for step in range(steps):
            if self._pending is not None:
                item, self._pending = self._pending[0], None
                yield self._batch(item, step)
                continue
            while True:
                if self._iterator is None:
                    self._iterator, fresh = iter(self.source), True
                try:
                    item = next(self._iterator)
                    fresh = False
                    break
                except StopIteration:
                    if self.one_shot or fresh:   # a generator, or an iterable with nothing
                        self.ran_out = True
                        return
                    self._iterator = None
            yield self._batch(item, step)
        if look_ahead and self.one_shot:
            try:
                self._pending = (next(self._iterator),)
            except StopIteration:
                self.ran_out = True

    def _batch(self, item, step):
        self.taken = step + 1
        owner, where = self.owner, f"{self.name} batch {step}"
        if not self.targets:
            takes_ids = bool(self.model.layers) and getattr(self.model.layers[0], "_takes_ids",
                                                            False)
            x = item[0] if isinstance(item, tuple) or _is_list_batch(item, 1 if takes_ids
                                                                     else 2) else item
            return ArrayData(owner, self.model, x, names=(where, "y", "sample_weight")).take(
                slice(None))
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise TypeError(f"{owner}: each batch of {self.name} must be a tuple (x, y) or "
                            f"(x, y, sample_weight), got {_describe(item)} in batch {step}")
        x, y = item[0], item[1]
        sw = item[2] if len(item) == 3 else None
        if y is None:
            raise TypeError(f"{owner}: batch {step} of {self.name} has no targets (y is None)")
        data = ArrayData(owner, self.model, x, y, sw,
                         names=(f"x of {where}", f"y of {where}",
                                f"sample_weight of {where}"))
        return data.take(slice(None))


def _is_list_batch(item, sequence_ndim):
    """A list that is an (x, y[, sample_weight]) batch (a PyTorch DataLoader
    yields lists), not a list of sequences: 2 or 3 items, the first with more
    dimensions than a sequence has (``sequence_ndim``: 2, or 1 for ids) or
    the items' dimensions differing."""
    if not isinstance(item, list) or len(item) not in (2, 3):
        return False
    ndims = []
    for part in item:
        try:
            ndims.append(np.ndim(part))
        except ValueError:   # a ragged nested list
            ndims.append(-1)
    return ndims[0] > sequence_ndim or len(set(ndims)) > 1


def held_out(n, split):
    """How many of n samples ``fit(validation_split=split)`` holds out for
    validation (its last ones): n - floor(n (1 - split)), Keras' rounding."""
    return n - int(math.floor(n * (1.0 - split)))


def _describe(item):
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)} items"
    if isinstance(item, np.ndarray):
        return f"an array of shape {shape_str(item.shape)}"
    return f"a {type(item).__name__}"


def make(owner, model, x, y=None, sample_weight=None, targets=True):
    """ArrayData or IterableData for what fit / evaluate / predict got."""
    if targets and y is None and not isinstance(x, np.ndarray) and _is_batches(x):
        if sample_weight is not None:
            raise ValueError(f"{owner}: sample_weight cannot go with x as an iterable of "
                             f"batches; give each batch as (x, y, sample_weight)")
        return IterableData(owner, model, x)
    if not targets and not isinstance(x, np.ndarray) and _is_batches(x):
        return IterableData(owner, model, x, targets=False)
    if targets and y is None:
        raise TypeError(f"{owner}: y is missing: pass the targets y with the array x, or x as "
                        f"an iterable of (x, y) batches")
    return ArrayData(owner, model, x, y, sample_weight)


def _is_batches(x):
    """x looks like an iterable of batches rather than array data."""
    if isinstance(x, (str, bytes, numbers.Number)) or hasattr(x, "__array__") \
            or hasattr(x, "__array_interface__"):
        return False
    if isinstance(x, (list, tuple)):
        return bool(x) and all(isinstance(item, tuple) for item in x)
    try:
        iter(x)
    except TypeError:
        return False
    return True


def validation(owner, model, validation_data):
    """The validation source for fit's validation_data."""
    if isinstance(validation_data, np.ndarray) or not (
            isinstance(validation_data, (tuple, list)) or _is_batches(validation_data)):
        raise TypeError(f"{owner}: validation_data must be a pair (x_val, y_val), a triple "
                        f"(x_val, y_val, sample_weight_val) or an iterable of batches, got "
                        f"{_describe(validation_data)}")
    pair = isinstance(validation_data, tuple) or (
        isinstance(validation_data, list) and not all(isinstance(item, tuple)
                                                      for item in validation_data))
    if pair:
        if len(validation_data) not in (2, 3):
            raise TypeError(f"{owner}: validation_data must be a pair (x_val, y_val) or a "
                            f"triple (x_val, y_val, sample_weight_val), got "
                            f"{_describe(validation_data)}")
        sw = validation_data[2] if len(validation_data) == 3 else None
        return ArrayData(owner, model, validation_data[0], validation_data[1], sw,
                         names=("validation x", "validation y", "validation sample_weight"))
    return IterableData(owner, model, validation_data, name="validation_data")


def warn_ran_out(owner, what):
    """Keras' warning when a generator runs out before the epochs end."""
    warnings.warn(f"{owner}: {what} ran out of batches; training stops. A generator runs "
                  f"once: pass steps_per_epoch with enough batches for every epoch, or an "
                  f"iterable that starts over (a list, or an object whose __iter__ returns a "
                  f"new iterator)", stacklevel=3)


def warn_validation_ran_out(owner, got, steps):
    """A one-shot validation_data ran out (``got`` of ``steps`` batches this
    epoch): no validation after this epoch's. (Without steps, fit refuses a
    generator before training.)"""
    warnings.warn(f"{owner}: validation_data ran out of batches ({got} of "
                  f"validation_steps={steps} this epoch); training stops after "
                  f"this epoch. A generator runs once: pass one that yields validation_steps "
                  f"batches for every epoch, or an iterable that starts over (a list, or an "
                  f"object whose __iter__ returns a new iterator)", stacklevel=3)


def warn_pass_ended(owner, steps_per_epoch, per_pass):
    """Keras' warning when an epoch of arrays reaches the end of the samples
    before steps_per_epoch batches."""
    warnings.warn(f"{owner}: the samples ran out before steps_per_epoch={steps_per_epoch} "
                  f"batches (a pass over them holds {per_pass}); this epoch ends early and "
                  f"the next one starts a new pass", stacklevel=3)
