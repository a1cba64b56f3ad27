"""What layers and cells share: read-only configuration, named parameters
under PyTorch's names, state_dict / load_state_dict, and the weight storage
the kernels read.

Parameters live in flat storage arrays (for a recurrent layer one per layer
and kind, both directions stacked: the layout the kernels want); the public
arrays are read-only views of them. A module's parameters form one
``ParamSet`` that is never written once made: ``load_state_dict``, attribute
assignment and optimizer steps build a new set from copies and swap it in
whole, and every call takes the current set once and computes with it alone.
So a call never sees a half-loaded or half-updated set, whatever other
threads do meanwhile, no caller's array is ever aliased, and a failed load
leaves the module unchanged.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import operator
import os
import threading
from collections import namedtuple
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike

from fastrnn._kernels import forward as _forward
from fastrnn import _validation as v
from fastrnn._locks import ForkSafeLock
from fastrnn._validation import shape_str, to_numpy

LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])

# kernel code, gate blocks G, and activations saved per step (in units of H;
# must match _gates.num_saved) of each cell kind
CELL_KINDS = {
    "rnn_tanh": (_forward.CELL_RNN_TANH, 1, 1),
    "rnn_relu": (_forward.CELL_RNN_RELU, 1, 1),
    "gru": (_forward.CELL_GRU, 3, 4),
    "gru_reset_before": (_forward.CELL_GRU_RESET_BEFORE, 3, 4),
    "lstm": (_forward.CELL_LSTM, 4, 4),
    # with gate options (_gate_options.py): pre-activations saved, and c_t
    "rnn_opt": (_forward.CELL_RNN_OPT, 1, 1),
    "gru_opt": (_forward.CELL_GRU_OPT, 3, 4),
    "gru_reset_before_opt": (_forward.CELL_GRU_RESET_BEFORE_OPT, 3, 4),
    "lstm_opt": (_forward.CELL_LSTM_OPT, 4, 5),
}
# the kind without options of each kernel code (which products it runs)
BASE_CODE = {_forward.CELL_RNN_OPT: _forward.CELL_RNN_TANH,
             _forward.CELL_GRU_OPT: _forward.CELL_GRU,
             _forward.CELL_GRU_RESET_BEFORE_OPT: _forward.CELL_GRU_RESET_BEFORE,
             _forward.CELL_LSTM_OPT: _forward.CELL_LSTM}


RESET_AFTER_DOC = """
    reset_after : bool, default True
        Where the reset gate acts. True: on W_hn h + b_hn, as PyTorch, Keras'
        default and ONNX ``linear_before_reset=1``. False: on h before the
        product, n = tanh(W_in x + b_in + W_hn (r * h) + b_hn), as Keras'
        ``reset_after=False`` and ONNX's default ``linear_before_reset=0``
        (no PyTorch equivalent). Keyword only, after PyTorch's arguments."""


def gru_kind(owner, reset_after):
    """The checked reset_after flag of a GRU and its CELL_KINDS key."""
    flag = v.check_bool(owner, "reset_after", reset_after)
    return flag, ("gru" if flag else "gru_reset_before")



# A module built only to be filled at once (by a model file's loader, or as
# the quantized copy of a float model) need not draw initial values it will
# never use: within ``parameters_filled_later()`` new modules start from
# zero storages (calloc'd: untouched pages cost no memory) and draw nothing
# from their generator. Loading a 160 MB LSTM file took 2.4 s and a peak of
# 4.4 times its bytes, the random values drawn and then replaced.
_filling = threading.local()


@contextlib.contextmanager
def _building(name, value):
    """Within: this thread's modules are built with ``_filling.name = value``."""
    before = getattr(_filling, name, None)
    setattr(_filling, name, value)
    try:
        yield
    finally:
        setattr(_filling, name, before)


def parameters_filled_later():
    """Within: new modules' parameters start as zeros, for a caller that
    loads every one of them before any use."""
    return _building("later", True)


def filled_later():
    """Whether modules built now will have every parameter loaded at once."""
    return bool(getattr(_filling, "later", False))


def weights_reduced(fraction):
    """Within: the modules built are quantized ones, whose weights take
    ``fraction`` of float32's bytes (see check_parameter_memory)."""
    return _building("reduced", fraction)


def sealed(storage):
    """``storage``'s values in an array that numpy will not make writeable: a
    view of a read-only memoryview of it (numpy refuses ``flags.writeable =
    True`` on such an array, its views and its base). A plain read-only array
    takes the flag back, and a write then changed the parameters under the
    kernels' caches of the set (the model kept computing with the old
    values while state_dict showed the new). ``storage`` itself is flagged
    read-only too; only code that digs it out of the memoryview (its
    ``.obj``) and flags it writeable again could still change it, which is
    writing into the library's internals. A sealed array comes back as it is (a quantized layer's
    load seals the storages it keeps: each load added a view, and a chain of
    300,000 crashed its deallocation)."""
    base = storage.base
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview) and base.readonly:
        return storage
    if not storage.flags.c_contiguous:
        storage = np.ascontiguousarray(storage)
    storage.flags.writeable = False
    flat = np.frombuffer(memoryview(storage).toreadonly(), dtype=storage.dtype)
    return flat if storage.ndim == 1 else flat.reshape(storage.shape)


class ParamSet:
    """One set of a module's parameters, read-only for good.

    ``storages`` the flat storage arrays, ``views`` name -> read-only view of
    its part of a storage, ``version`` counts the sets the module has had,
    ``cache`` holds what the kernels derive from this set (transposed
    weights, folded biases, runners): it can never go stale, since the set
    never changes.
    """
    __slots__ = ("version", "storages", "views", "cache")

    def __init__(self, version, storages, names):
        self.version = version
        self.storages = tuple(sealed(storage) for storage in storages)
        self.views = {name: (self.storages[i] if rows is None else self.storages[i][rows])
                      for name, (i, rows) in names.items()}
        self.cache = {}


# --- the parameter sets of several modules, changed and read together -------
# A Sequential's layers (or an optimizer's modules) take their new sets at
# once: loads and steps of several modules run in ``changing_together``,
# which holds the modules' locks throughout and makes the new sets current
# together at its end, under _COMMIT. A Sequential's call takes its layers'
# current sets together, under the same lock, and every layer computes with
# the set taken (``run_pinned``, read by ``call_parameters``): a call
# running meanwhile sees all the old sets or all the new, never a mix.
# Readers of several modules' parameters at once (a Sequential's state_dict,
# save, pickling, quantize) run ``holding`` their locks. A pure inference
# call may instead run unpinned and check ``commits`` after: unchanged
# since its start (and even then), no commit happened meanwhile, so its
# layers read one moment's sets; else it runs again, pinned (pinning costs
# about 1 us a call, the check nothing).
_COMMIT = ForkSafeLock()
_PINS = ContextVar("fastrnn_pinned_parameters", default=None)
_changing = threading.local()     # .pending: this thread's new sets, not yet current
# changing_together's commits, doubled; odd during one (in a list: _commit
# sets it with the sets, in one C-level pass)
commits = [0]


def call_parameters(module):
    """The parameter set a call of ``module`` computes with: the one pinned
    for the call around it, else the current one."""
    pins = _PINS.get()
    return module._params if pins is None else pins.get(module, module._params)


def run_pinned(modules, run):
    """``run()`` with calls of ``modules`` computing with their sets current
    now, taken together (an enclosing pin's sets stay). The pins live in a
    copy of the context that ``run`` runs in, never in the caller's: an
    interrupt anywhere cannot leave them set (as a set and reset of a
    context variable could, split by a signal handler that raises)."""
    with _COMMIT:
        pins = {m: m._params for m in modules}
    outer = _PINS.get()
    if outer:
        pins.update(outer)

    def pinned():
        _PINS.set(pins)
        return run()

    return contextvars.copy_context().run(pinned)


def on_one_set(modules, run, repeatable):
    """``run()`` with the parameter sets of ``modules`` of one moment: pinned,
    or, if ``repeatable`` (no effect but its result), unpinned and run again
    pinned if a commit came meanwhile."""
    if len(modules) < 2:
        return run()
    if repeatable:
        start = commits[0]
        if not start & 1:
            result = run()
            if commits[0] == start:
                return result
    return run_pinned(modules, run)


def holding(modules):
    """Hold the locks of ``modules`` (each once, in one global order, so that
    two holders never wait for each other): no load, optimizer step or
    gradient change of theirs meanwhile."""
    locks = {id(m._grad_lock): m._grad_lock for m in modules}
    return _held([locks[key] for key in sorted(locks)])


@contextlib.contextmanager
def _held(locks):
    # nested with blocks in a generator: an interrupt between two takes
    # releases those taken (as does the generator's close, if one comes
    # after the last take but before the caller's block begins)
    if not locks:
        yield
        return
    with locks[0], _held(locks[1:]):
        yield


@contextlib.contextmanager
def changing_together(modules):
    """Loads and optimizer steps of ``modules`` within make their new sets
    current together when the block ends without an error, with whatever
    else the block gave ``set_with_parameters`` (an optimizer's moments);
    after an error or an interrupt, none (every module unchanged). Nested:
    the outermost block commits."""
    with holding(modules):
        if getattr(_changing, "pending", None) is not None:
            yield
            return
        _changing.pending = pending = {}
        try:
            yield
            _commit(pending)
        finally:
            _changing.pending = None


def _commit(pending):
    """Set every (object, attribute) of ``pending`` to its value, and
    ``commits`` around them, in one pass of C calls (operator.setitem on
    the objects' __dict__, mapped), which no signal handler can split: a
    Python loop checks for one at each turn, and an interrupt there would
    leave some modules' new sets current and others' not. The values
    replaced stay referenced until the pass is over (a destructor could run
    Python code)."""
    with _COMMIT:
        replaced = [getattr(obj, name) for obj, name in pending]
        n = commits[0]
        targets = [commits] + [obj.__dict__ for obj, _ in pending] + [commits]
        keys = [0] + [name for _, name in pending] + [0]
        values = [n + 1] + list(pending.values()) + [n + 2]
        collections.deque(map(operator.setitem, targets, keys, values), maxlen=0)
    del replaced


def add_at_once(pairs):
    """``target += addend`` for every (target, addend) of ``pairs`` in one
    pass of C calls (np.add mapped), which no signal handler can split: a
    backprop's gradients are added all or none (a Python loop over them,
    interrupted, had added some)."""
    targets = [target for target, _ in pairs]
    collections.deque(map(np.add, targets, [addend for _, addend in pairs], targets),
                      maxlen=0)


def set_at_once(items):
    """``obj.name = value`` for every (obj, name, value) of ``items`` in one
    pass of C calls, which no signal handler can split (as ``_commit``): a
    learning-rate schedule's epoch and its optimizer's rate move together.
    Written into the objects' ``__dict__``: no property or __setattr__ runs."""
    collections.deque(map(operator.setitem, [obj.__dict__ for obj, _, _ in items],
                          [name for _, name, _ in items], [value for _, _, value in items]),
                      maxlen=0)


def set_with_parameters(obj, name, value):
    """``obj.name = value``, at once or with the sets of the
    ``changing_together`` around (the caller holds its modules' locks)."""
    pending = getattr(_changing, "pending", None)
    if pending is None:
        setattr(obj, name, value)
    else:
        pending[obj, name] = value


def set_parameters(module, params):
    """Make ``params`` the current set of ``module`` (whose lock the caller
    holds), at once or at the end of the ``changing_together`` around."""
    set_with_parameters(module, "_params", params)


def latest_parameters(module):
    """The set a new one is built from: this thread's pending one, if any."""
    pending = getattr(_changing, "pending", None)
    return module._params if not pending else pending.get((module, "_params"), module._params)


def _refuse_quantized_entry(owner, state_dict, name):
    """A quantized model's state_dict (fastrnn.quantized) holds bfloat16 bit
    patterns (uint16) or int8 codes beside their scales: loaded into a float
    model they would become numbers far from the weights."""
    dtype = getattr(state_dict[name], "dtype", None)
    if type(dtype).__module__ == "torch":   # the same arrays as torch tensors
        try:
            dtype = np.dtype(str(dtype).removeprefix("torch."))   # torch.int8 -> int8
        except TypeError:                                        # bfloat16, ...: a float
            return
    if not isinstance(dtype, np.dtype):
        return
    if dtype == np.uint16:
        quantized = "bfloat16 bit patterns (uint16)"
    elif dtype.kind in "iu" and f"{name}_scale" in state_dict:
        quantized = "int8 weights (with their scales)"
    else:
        return
    raise TypeError(f"{owner}: state_dict[{name!r}] holds a quantized model's {quantized}, "
                    f"not the weights' values; load it into a quantized model "
                    f"(fastrnn.quantize(model).load_state_dict), or convert integers meant "
                    f"as values with astype(np.float32)")


# values drawn at a time for a parameter's initial values (fill_drawn)
DRAW_CHUNK = 1 << 20


def fill_drawn(out, draw):
    """Fill ``out`` with ``draw(n)`` (float64 values), DRAW_CHUNK at a time:
    the values one draw of out.size would give (a Generator's uniform and
    standard_normal take their stream value by value), without that whole
    float64 draw, which made a float32 layer's construction hold three
    times its parameters' bytes at once."""
    flat = out.reshape(-1)
    if not np.shares_memory(flat, out):   # (not contiguous: one draw)
        out[...] = draw(out.size).reshape(out.shape)
        return out
    for start in range(0, flat.size, DRAW_CHUNK):
        stop = min(flat.size, start + DRAW_CHUNK)
        flat[start:stop] = draw(stop - start)
    return out


def check_parameter_memory(owner, nbytes, config, objects=0):
    """A MemoryError, before anything is allocated, for parameters that with
    their gradients (2 x ``nbytes``) exceed this machine's memory. Each
    storage alone would be allocated (many small ones succeed one by one
    until the system kills the process; num_layers = 10**7 asked for 630 GiB
    so, an hour into the allocations). ``config``: (name, value) of the
    sizes and options to name in the message. A quantized module filled
    later (quantize, a file) needs its reduced weights only: its float
    storages and gradients stay untouched zeros (no memory). ``objects``:
    the bytes of the Python objects that go with them (a layer of a stack
    takes ~6 KB of views, names and kernel state: num_layers = 10**7 of
    size 1 passed as 0.3 GiB of parameters and grew to 57 GiB)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):   # (no sysconf: Windows)
        return
    reduced = getattr(_filling, "reduced", None)
    if reduced is not None and filled_later():
        need, what = int(nbytes * reduced) + objects, "its reduced weights need"
    else:
        need, what = 2 * nbytes + objects, "its parameters and their gradients need"
    if memory > 0 and need > memory:
        given = ", ".join(f"{name}={value}" if isinstance(value, (bool, str)) else
                          f"{name}={v.int_str(value)}" for name, value in config)
        counted = (f" (with {v.bytes_text(objects)} of objects for its layers)"
                   if objects > need // 100 else "")   # (said where it counts)
        raise MemoryError(f"{owner}({given}): {what} {v.bytes_text(need)}{counted}, more than "
                          f"this machine's {v.bytes_text(memory)} of memory")


def config_value(value):
    """A setting as an attribute reads it: a list (a zoneout pair, an
    activation with its parameters, per-direction specs) as a copy, since the
    kernels' settings were derived from it at construction and an in-place
    change (``layer.zoneout[0] = 0.9``) would reach the copies, saves and
    exports but not the layer's own calls."""
    return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


class Module:
    """Base of every public class: configuration and named parameters.

    A subclass's constructor adds its storage arrays (``_add_storage``),
    names the parameters in them (``_register``), initialises them, then
    calls ``_seal_parameters`` to make them the first ParamSet.
    """

    # whether a call reads fastrnn._own_values' context (the quantized classes
    # do); found on the class, so that asking a float layer costs no __getattr__
    _reads_own_values = False
    # what a Sequential and a Stream ask of each layer, on the class for the
    # same reason (a missing attribute raised inside __getattr__: ~1 us a
    # question, two a layer in every streamed frame): whether it makes a
    # Keras mask (Embedding with mask_zero), takes one, takes ids
    _makes_mask = False
    _takes_mask = False
    _takes_ids = False

    def __init__(self):
        # set through object: our __setattr__ reads these
        object.__setattr__(self, "_config", {})
        object.__setattr__(self, "_names", {})    # name -> (storage index, rows or None)
        self._draft = []                          # storages under construction
        self._draft_grads = []                    # and their gradients
        self._params = None                       # the current ParamSet
        self._trainable = ()                      # the gradient of each storage
        self._grads = MappingProxyType({})
        # no backprop has added into the gradients since the last zero_grad
        # (or since construction): an optimizer's step skips such a module
        # while they hold only zeros, as PyTorch's skips a parameter whose
        # grad zero_grad set to None (optim._took_no_gradient)
        self._grads_zeroed = True
        # guards the gradients (backprop adds, clipping scales, zero_grad)
        # and the swap of parameter sets (loads and optimizer steps);
        # reentrant: changing_together holds it around a module's own load
        self._grad_lock = ForkSafeLock(reentrant=True)

    # --- configuration and parameters as attributes -------------------------
    def __getattr__(self, name):
        # only reached when ordinary lookup fails
        d = self.__dict__
        if name in d.get("_names", ()) and d.get("_params") is not None:
            return d["_params"].views[name]
        if name in d.get("_config", ()):
            return config_value(d["_config"][name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        # a parameter first: Linear's ``bias`` names both its setting and,
        # where that is True, its parameter (which reads and loads so)
        if name in self._names:
            self.load_state_dict({name: value}, strict=False)
            return
        if name in self._config:
            raise AttributeError(f"{type(self).__name__}: {name} is fixed at construction; "
                                 f"create a new {type(self).__name__} to change it")
        object.__setattr__(self, name, value)

    def _add_storage(self, storage, grad):
        """A storage array being built, with its gradient; returns its index."""
        self._draft.append(storage)
        self._draft_grads.append(grad)   # (a tuple grown a storage at a time: quadratic)
        return len(self._draft) - 1

    def _register(self, name, index, rows=None):
        """Name rows ``rows`` (a slice, or None for all) of storage ``index``."""
        self._names[name] = (index, rows)

    def _seal_parameters(self):
        """The initialised storages become the first parameter set."""
        self._params = ParamSet(0, self._draft, self._names)
        self._trainable = tuple(self._draft_grads)
        del self._draft, self._draft_grads

    @property
    def _version(self):
        return self._params.version

    def _swap_parameters(self, update):
        """Build the next parameter set: ``update(storages)`` writes into
        fresh copies of the current storages, which then replace them whole.
        The caller holds ``_grad_lock`` (one update at a time)."""
        current = latest_parameters(self)
        storages = [s.copy() for s in current.storages]
        update(storages)
        set_parameters(self, ParamSet(current.version + 1, storages, self._names))

    @property
    def grads(self) -> Mapping[str, np.ndarray]:
        """Accumulated gradients: same names and shapes as ``state_dict()``.

        A read-only mapping of writeable arrays: backprop adds into them,
        ``zero_grad()`` clears them, and gradient clipping may scale them.
        """
        return self._grads

    def zero_grad(self) -> None:
        """Set every accumulated gradient to zero."""
        with self._grad_lock:
            for grad in self._trainable:
                grad[...] = 0
            self._grads_zeroed = True

    # --- state dict ---------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, under PyTorch's names, in PyTorch's order.

        Returns
        -------
        dict of str to ndarray
            Independent copies: changing them does not change the module.
        """
        return {name: view.copy() for name, view in self._params.views.items()}

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike],
                        strict: bool = True) -> LoadResult:
        """Copy parameters in from a mapping of name to array.

        Accepts numpy arrays, torch tensors (a PyTorch module's ``state_dict()``
        loads directly) or anything array-like of a real dtype, but not a
        quantized model's state_dict (uint16 bfloat16 bits, or int8 weights
        beside their ``_scale``: not the weights' values); values are
        converted to the module's dtype. Every name, shape and value is checked
        before anything is copied, so on error the module is unchanged. The
        new values replace the old as one set: a call running in another
        thread meanwhile computes with the old set or the new, never a mix.

        Parameters
        ----------
        state_dict : mapping of str to array-like
        strict : bool, default True
            If True, the names must match exactly. If False, missing names keep
            their current values and unexpected names are ignored.

        Returns
        -------
        LoadResult
            Named tuple ``(missing_keys, unexpected_keys)``.

        Raises
        ------
        TypeError
            If ``state_dict`` is not a mapping, a value is not a real array,
            or the mapping is a quantized model's.
        ValueError
            On a missing or unexpected name (strict), a wrong shape, or a
            non-finite value.
        """
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}: load_state_dict expects a mapping of name to array, "
                            f"got {type(state_dict).__name__}")
        strict = v.check_bool(f"{owner}.load_state_dict", "strict", strict)
        names = self._names
        for name in names:
            if name in state_dict:
                _refuse_quantized_entry(owner, state_dict, name)
        missing = [name for name in names if name not in state_dict]
        unexpected = [key for key in state_dict if key not in names]
        if strict and (missing or unexpected):
            raise ValueError(f"{owner}: load_state_dict: missing keys {missing}, "
                             f"unexpected keys {unexpected}; expected exactly "
                             f"{list(names)}")
        converted = {}
        views = self._params.views
        for name in names:
            if name not in state_dict:
                continue
            value = to_numpy(owner, f"state_dict[{name!r}]", state_dict[name])
            expected = views[name].shape
            if value.shape != expected:
                raise ValueError(f"{owner}: expected {name} of shape {shape_str(expected)}, "
                                 f"got {shape_str(value.shape)}")
            with np.errstate(over="ignore"):  # overflow is reported just below
                # (no copy of a value already of the dtype: write copies it in)
                value = value.astype(self.dtype, copy=False)
            if not np.isfinite(value).all() and not getattr(_restoring, "active", False):
                raise ValueError(f"{owner}: {name} has non-finite values (NaN or inf) "
                                 f"after conversion to {self.dtype}")
            converted[name] = value

        def write(storages):
            for name, value in converted.items():
                index, rows = names[name]
                storages[index][slice(None) if rows is None else rows] = value

        if converted:   # (a load of nothing keeps the set: a pending backprop still runs)
            with self._grad_lock:
                self._swap_parameters(write)
        return LoadResult(missing, unexpected)

    def save(self, path: str | os.PathLike) -> None:
        """Write this layer or cell to one file (``.safetensors`` for a path
        ending so, else ``.npz``): its configuration, weights and random
        state (no pickle); ``fastrnn.load`` rebuilds it. See ``fastrnn.save``."""
        from fastrnn.model import save   # fastrnn.model imports this module
        save(self, v.check_path(f"{type(self).__name__}.save", "path", path))

    def __reduce__(self):
        """Pickle as constructor arguments, parameters and random state, so
        that the copy rebuilds its storage and behaves identically
        (accumulated gradients are not kept)."""
        config = {k: (val.name if isinstance(val, np.dtype) else val)
                  for k, val in self._config.items()}
        return _rebuild, (type(self), config, self.state_dict(), getattr(self, "_rng", None))

    def __copy__(self):
        # as a pickle round trip: the copy's random generator is its own (copy.copy
        # would hand it this one, and training either would advance both)
        rebuild, (cls, config, state_dict, rng) = self.__reduce__()
        return rebuild(cls, config, state_dict, copy.deepcopy(rng))

    def __repr__(self):
        cfg = self._config
        args = [str(cfg["input_size"]), str(cfg["hidden_size"])]
        options = self._repr_options()
        if cfg.get("reset_after") is False:   # the GRUs' non-default form
            options.append(("reset_after", False))
        args += [f"{k}={v!r}" for k, v in options]
        return f"{type(self).__name__}({', '.join(args)})"

    def _repr_options(self):
        return []


_restoring = threading.local()   # .active: loading a copy's own values back (restoring_copy)


@contextlib.contextmanager
def restoring_copy():
    """Loads within restore a module's own values (an unpickled copy):
    non-finite ones too, which ``load_state_dict`` refuses from a caller. A
    model whose training diverged pickles (Dask, joblib) as it is."""
    _restoring.active = True
    try:
        yield
    finally:
        _restoring.active = False


def _rebuild(cls, config, state_dict, rng):
    with parameters_filled_later():   # (the state dict holds every parameter)
        module = cls(**config)
    with restoring_copy():
        module.load_state_dict(state_dict)
    if rng is not None:
        module._rng = rng
    return module


class RecurrentWeights(Module):
    """Weights and gradients of a stack of recurrent layers (the kernel
    drivers are _engine.RecurrentEngine's).

    ``layers`` x ``dirs`` blocks of (W_ih, W_hh, b_ih, b_hh), each kind stacked
    over directions in one (dirs * G * H, ...) array per layer: the input
    projection of both directions is then one GEMM. Gradients have the same
    layout and names.
    """

    def _build(self, kind, input_size, hidden_size, layers, dirs, bias, dtype, rng, names,
               dropout=0.0, peepholes=False, initial_state=False, layer_norm=False,
               proj_size=0):
        """Allocate, register under ``names(layer, direction)`` and initialise.
        peepholes: an LSTM's peephole weights too, (3 H,) per layer and
        direction (i, f, o), named as W_hh with ``weight_peephole``.
        initial_state: learned initial states too, (H,) per layer and
        direction, named as W_hh with ``initial_h`` (and ``initial_c`` for an
        LSTM), zero-initialised (they draw nothing from rng, so the other
        parameters are those of the layer without them).
        layer_norm: the LN gains and biases too (see ``ln_names``).
        proj_size: P > 0 gives an LSTM's projection of h (PyTorch's
        ``proj_size``): W_hr (P, H) per layer and direction, named as W_hh
        with ``weight_hr``, registered after the biases as PyTorch does; the
        state h and the layers' outputs are then P wide (W_hh (G H, P),
        W_ih of layer k > 0 (G H, dirs P))."""
        self._kernel_code, self._gates, self._saved = CELL_KINDS[kind]
        # the kind without options: the products, the packed weights, the fast paths
        self._base_code = BASE_CODE.get(self._kernel_code, self._kernel_code)
        self._option_rows = None   # the *_OPT kinds': _gate_options.option_rows
        self._zoneout = None       # (rate_h, rate_c) or None
        self._dropouts = None      # Keras' (input_dropout, recurrent_dropout) or None
        self._general_only = False
        gates = self._gates
        owner = type(self).__name__
        if dirs * gates * hidden_size > v.BLAS_INT_MAX:
            raise ValueError(f"{owner}: hidden_size {v.int_str(hidden_size)} is too large: "
                             f"{dirs} x {gates} x hidden_size must fit a 32-bit BLAS int")
        if input_size > v.BLAS_INT_MAX:
            raise ValueError(f"{owner}: input_size {v.int_str(input_size)} is too large for a "
                             f"32-bit BLAS int")
        self._layers, self._dirs, self._dropout, self._rng = layers, dirs, dropout, rng
        GH = gates * hidden_size
        # the width of the state h and of each direction's output
        self._out_size = out = proj_size or hidden_size
        check_parameter_memory(owner, np.dtype(dtype).itemsize * dirs * (
            GH * (input_size + out + 2) + (layers - 1) * GH * (dirs * out + out + 2)
            + (layers * out * hidden_size if proj_size else 0)),
            [("input_size", input_size), ("hidden_size", hidden_size)]
            + [(name, value) for name, value, default in (
                ("num_layers", layers, 1), ("bidirectional", dirs == 2, False),
                ("proj_size", proj_size, 0), ("dtype", np.dtype(dtype).name, "float32"))
               if value != default],
            objects=layers * (4096 + 2048 * dirs))   # (measured: 5.5 KB, 7.5 bidirectional)
        kinds = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
        # storage index of each kind and layer (None: no bias)
        index = {key: [None] * layers for key in kinds}
        grads = {key: [None] * layers for key in kinds}
        for key in kinds:
            if (key.startswith("b") and not bias) or (key == "w_hr" and not proj_size):
                continue
            for k in range(layers):
                in_size = input_size if k == 0 else dirs * out
                shape = {"w_ih": (dirs * GH, in_size), "w_hh": (dirs * GH, out),
                         "b_ih": (dirs * GH,), "b_hh": (dirs * GH,),
                         "w_hr": (dirs * out, hidden_size)}[key]
                grads[key][k] = np.zeros(shape, dtype)
                index[key][k] = self._add_storage(np.zeros(shape, dtype), grads[key][k])
        grad_views = {}
        for k in range(layers):
            for d in range(dirs):
                layer_names = names(k, d)
                layer_names += (layer_names[1].replace("weight_hh", "weight_hr"),)
                for key, name in zip(kinds, layer_names):
                    if index[key][k] is not None:
                        rows = slice(d * out, (d + 1) * out) if key == "w_hr" else \
                            slice(d * GH, (d + 1) * GH)
                        self._register(name, index[key][k], rows)
                        grad_views[name] = grads[key][k][rows]
        self._storage_index = tuple(index[key] for key in kinds[:4])
        self._dw_ih, self._dw_hh, self._db_ih, self._db_hh = (grads[key] for key in kinds[:4])
        # the projections' storage per layer (empty without proj_size)
        self._proj_index = index["w_hr"] if proj_size else []
        self._dw_hr = grads["w_hr"] if proj_size else []
        self._peep_index, self._dpeep = [], []
        for k in range(layers if peepholes else 0):
            self._dpeep.append(np.zeros(dirs * 3 * hidden_size, dtype))
            self._peep_index.append(self._add_storage(np.zeros(dirs * 3 * hidden_size, dtype),
                                                      self._dpeep[k]))
            for d in range(dirs):
                rows = slice(d * 3 * hidden_size, (d + 1) * 3 * hidden_size)
                name = names(k, d)[1].replace("weight_hh", "weight_peephole")
                self._register(name, self._peep_index[k], rows)
                grad_views[name] = self._dpeep[k][rows]
        # layer norm (fastrnn._layernorm_engine): per layer one storage of
        # dirs rows of P values, the parameters of a direction in the order
        # its kernel reads them
        self._ln_index, self._dln = [], []
        ln_sizes = ln_parameter_sizes(kind, hidden_size) if layer_norm else ()
        P = sum(ln_sizes)
        for k in range(layers if layer_norm else 0):
            self._dln.append(np.zeros(dirs * P, dtype))
            self._ln_index.append(self._add_storage(np.zeros(dirs * P, dtype), self._dln[k]))
            for d in range(dirs):
                start = d * P
                for name, size in zip(ln_names(names(k, d)[0]), ln_sizes):
                    self._register(name, self._ln_index[k], slice(start, start + size))
                    grad_views[name] = self._dln[k][start:start + size]
                    start += size
        # PyTorch's reset_parameters: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))
        bound = 1.0 / np.sqrt(hidden_size)
        for i, rows in () if filled_later() else self._names.values():
            part = self._draft[i][rows]
            fill_drawn(part, lambda n: rng.uniform(-bound, bound, size=n))
        # but layer norm's gains start at 1 and its biases at 0 (nn.LayerNorm's)
        for k in range(0 if filled_later() else len(self._ln_index)):
            for d in range(dirs):
                for name, _ in zip(ln_names(names(k, d)[0]), ln_sizes):
                    i, rows = self._names[name]
                    self._draft[i][rows] = 1.0 if "_weight" in name else 0.0
        # learned initial states: one storage per kind (h, and c for an LSTM)
        # laid out as the state, (layers * dirs, H) flattened; zeros
        self._init_index, self._dinit = [], []
        state_kinds = ("initial_h", "initial_c") if self._has_cell_state else ("initial_h",)
        for state_kind in state_kinds if initial_state else ():
            width = out if state_kind == "initial_h" else hidden_size
            self._dinit.append(np.zeros(layers * dirs * width, dtype))
            self._init_index.append(self._add_storage(
                np.zeros(layers * dirs * width, dtype), self._dinit[-1]))
            for k in range(layers):
                for d in range(dirs):
                    row = k * dirs + d
                    rows = slice(row * width, (row + 1) * width)
                    name = names(k, d)[1].replace("weight_hh", state_kind)
                    self._register(name, self._init_index[-1], rows)
                    grad_views[name] = self._dinit[-1][rows]
        self._grads = MappingProxyType(grad_views)
        self._seal_parameters()

    def _learned_state(self, params):
        """The learned initial states of a parameter set, each (layers * dirs,
        H) (h, and c for an LSTM; h is proj_size wide with a projection), or
        None when the module has none."""
        if not self._init_index:
            return None
        rows = self._layers * self._dirs
        return tuple(params.storages[i].reshape(rows, -1) for i in self._init_index)

    def _initial_grads(self, dh0, dc0=None):
        """(gradient, what to add to it) of each learned initial state: the
        sum over the batch of its gradient dh0 (or dc0), (layers * dirs, B, H)."""
        return [(grad, d0.sum(axis=1).reshape(-1)) for grad, d0 in zip(self._dinit, (dh0, dc0))]

    def _weights(self, params):
        """(w_ih, w_hh, b_ih, b_hh) of a parameter set: per kind a list over
        layers of its storage arrays, (dirs * G * H, ...) each (None: no bias)."""
        cached = params.cache.get("weights")
        if cached is None:
            cached = params.cache["weights"] = tuple(
                [None if i is None else params.storages[i] for i in per_layer]
                for per_layer in self._storage_index)
        return cached

    def _projections(self, params):
        """Per layer W_hr (dirs * P, H) of a parameter set (proj_size > 0)."""
        return [params.storages[i] for i in self._proj_index]

    def _peepholes(self, params):
        """Per layer the peephole weights (dirs * 3 * H,) of a parameter set,
        or None when the layer has none."""
        if not self._peep_index:
            return [None] * self._layers
        return [params.storages[i] for i in self._peep_index]


def ln_names(weight_ih_name):
    """The layer-norm parameters' names of the layer and direction whose
    W_ih is named ``weight_ih_name`` (``weight_ih_l0_reverse`` gives
    ``ln_ih_weight_l0_reverse``, ...; a cell's ``weight_ih`` gives
    ``ln_ih_weight``, ...): the gain and bias of the input side's LN, of the
    recurrent side's, and for the LSTM (the last two) of the cell's."""
    sfx = weight_ih_name[len("weight_ih"):]
    return tuple(f"ln_{part}_{what}{sfx}" for part in ("ih", "hh", "cell")
                 for what in ("weight", "bias"))


def ln_parameter_sizes(kind, hidden_size):
    """The sizes of the ``ln_names`` parameters of a kind: the input and
    recurrent sides' over G * H values, the LSTM's cell's over H."""
    gates = CELL_KINDS[kind][1]
    sizes = (gates * hidden_size,) * 4
    return sizes + ((hidden_size,) * 2 if kind == "lstm" else ())


def dropout_mask(rng, shape, p, dtype):
    """Inverted dropout: 0 with probability p, else 1 / (1 - p)."""
    return (rng.random(shape) >= p).astype(dtype) / np.asarray(1 - p, dtype)
