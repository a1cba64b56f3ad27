"""The kernel drivers of the recurrent layers and cells: how a call's plan
(_plan.py) becomes kernel calls, and the training tape between the forward
and BPTT.

A layer's parameters are stored by ``_module.RecurrentWeights`` (named
storage arrays, one immutable ``ParamSet`` per version; state_dict, the
registry and pickling); ``RecurrentEngine`` adds the drivers and reads the
storage only through ``_weights(params)`` and the configuration:

- ``_run``: the forward of every layer (inference or the training forward):
  asks ``_plan.forward_plan``, then per layer ``_forward.project`` (the input
  projection of every step at once) and ``_forward.recur`` (the time loops,
  one part per thread) or ``_forward.recur_units`` (batch 1, or a few rows
  over a large W_hh: the hidden units split between threads); in training it
  records a :class:`Tape`. A float32 inference whose parts are ranges of the
  batch runs as one job (the plan's ``stack``: ``SequenceRunner.run_stack``,
  each part its rows through every layer, projections included);
- ``_bptt``: backward through a tape: ``_plan.backward_plan``, then per layer
  ``_backward.backward_layer`` (the reverse time loops) or
  ``_backward.backward_units`` (float32 at batch 1 or a few rows, the units
  split as in the forward), ``weight_grads`` and ``input_grad`` (the
  products over all rows, in the plan's ``products`` parts);
- a layer-normalised layer (``layer_norm=True``) or an LSTM with a projection
  (``proj_size``) runs its own drivers from ``_run_layers`` and ``_bptt``
  (``_layernorm_engine.py``, ``_projection_engine.py``), on the same plan;
- derived weights, computed once per parameter set and kept in its cache:
  the folded biases and W_hh^T (``_kernel_weights``), and for float32 the
  weights packed for the micro-kernel (``_packed_*``).

The small calls skip all this: ``_forward.SequenceRunner`` (layers) and
``_forward.CellStep`` (cells) run one-thread inference straight from plain
arrays, with the same kernels and the plan's limits (``_plan.runner_limits``).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import platform
import sys
import weakref
from dataclasses import dataclass, field

import numpy as np

from fastrnn._kernels import backward as _backward
from fastrnn._kernels import forward as _forward
from fastrnn import _layernorm_engine, _parallel, _plan, _projection_engine
from fastrnn import _validation as v
from fastrnn._locks import ForkSafeLock
from fastrnn._module import ParamSet, RecurrentWeights, add_at_once, dropout_mask
from fastrnn._validation import shape_str


def _prime_malloc():
    """Let glibc's malloc keep the buffers of one call for the next.

    glibc serves a block from fresh pages (mmap) until a block that large
    has been freed, and trims the top of its heap once more than twice that
    is free there. In a fresh process every call's buffers of a few hundred
    KB to a few MB (input projections, the training tape, the layers between)
    therefore came from new pages at every call, each page faulted in and
    zeroed: 295 page faults per call of a 2-layer RNN 1->50 at B=32, T=50
    (0.49 ms a call instead of 0.14 at 2 threads), 907 for an RNN 64->128 at
    B=32, T=100 (1.46 vs 0.44 ms), 168 per training step of the first (0.49
    vs 0.22 ms backward). Freeing one block just under glibc's 32 MB cap
    raises both thresholds, as in any process that has once freed an array
    that large: blocks below 31 MB then come from the heap, which keeps up
    to 62 MB free at its top. (Keeping the buffers in a pool of our own was
    tried: it did as well for inference but, holding big blocks, kept glibc
    from adapting, so the other allocations of a call faulted instead.)
    Thresholds the environment sets (MALLOC_TRIM_THRESHOLD_ and the like; a
    dask LocalCluster sets that one to 64 KB) fix glibc's and take
    precedence.
    """
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        np.empty(31 << 20, np.uint8)   # allocated and freed at once


_prime_malloc()


def _glibc_malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library or system)."""
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        return None
    import ctypes
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()
# let go of at least this many bytes of training buffers at once (a fit's
# end), give the heap's free pages back to the system
TRIM_AFTER_BYTES = 16 << 20


def trim_heap():
    """Give the free pages of the heap back to the system (glibc's
    malloc_trim). With the thresholds ``_prime_malloc`` raised, glibc kept
    what a fit had freed, its training buffers among it, in the process for
    good: 118 MB more resident after the fit of an LSTM 64 -> 512 at B=32,
    T=100, 3.7 MB after the trim, which took 2-6 ms (2026-12-08). The next
    calls fault in the pages they need again, once."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _TrainingBuffers:
    """The training forward's and BPTT's own buffers of 1 MB or more (the
    input projection, the saved activations and states, the gate gradients),
    lent again at the next step.

    Left to glibc they came from fresh pages, each faulted in and zeroed,
    whenever a step's buffers summed to more than the heap keeps free at its
    top (twice the largest block freed so far, 62 MB at most: see
    ``_prime_malloc``), or, at 32 MB and above, always. A GRU 125 -> 100 at
    B=64, T=150 (about 70 MB a step) took 4,650 page faults a step, 52 ms
    instead of 39 at one thread, once an inference output of 3.8 MB was held
    (``tests/test_training_buffers.py`` counts them); an LSTM 256 -> 512 at
    B=64, T=100 (three buffers of 52 MB) spent 10-11% of its step in the
    kernel zeroing new pages.

    A layer keeps them here, keyed by the layer (weakly: they go with it),
    and lends one again when nothing else holds it any more (its reference
    count: the tape of an earlier step still in use keeps its own). Each
    training forward begins a step (``new_step``); a buffer not lent in the
    last KEPT_STEPS steps is let go, so buffers of shapes no longer asked
    for do not pile up, while batches of a few shapes in turn (bucketed
    lengths, two forwards before their backprops, a layer used twice in a
    model) find theirs again; and, of those not lent in the step before,
    the least recently lent go first while they take more than
    MAX_IDLE_BYTES (shapes changing at every step of a large layer). The
    layer's next call outside training (``_lends_buffers`` tells it there
    is something to let go), the end of a ``Sequential.fit``, or its
    deletion, lets them all go. None of these buffers is ever handed to the
    caller.

    A call made while this thread is inside one of these methods (from a
    signal handler, or a finalizer the collector runs there) would wait for
    good on a plain lock, which its own thread holds. So the lock is
    reentrant, and such a call finds the pool ``_busy`` and leaves it alone
    (a fresh buffer, no step, nothing let go): the interrupted method's view
    of the entries stays whole. A forked child starts with an empty pool
    (another thread of the parent may have been inside it).
    """

    BIG_BYTES = 1 << 20
    # steps (training forwards) a buffer stays kept unused: 4 serves two to
    # four shapes in turn; shapes changing at every step keep at most four
    # steps' buffers idle
    KEPT_STEPS = 4
    MAX_IDLE_BYTES = 256 << 20

    def __init__(self):
        self._lock = ForkSafeLock(reentrant=True)
        self._busy = False   # a method runs (under the lock)
        self._kept = weakref.WeakKeyDictionary()   # owner -> _Lent

    def after_fork_in_child(self):
        """A forked child's pool: empty, not busy (its lock is made anew:
        ForkSafeLock)."""
        self._busy = False
        self._kept = weakref.WeakKeyDictionary()

    def _alone(self, work):
        """``work()`` under the lock, the pool to itself; None, without
        running it, when this thread is inside the pool already (see the
        class)."""
        with self._lock:
            if self._busy:
                return None
            self._busy = True
            try:
                return work()
            finally:
                self._busy = False

    def new_step(self, owner):
        """A training forward of ``owner`` begins: its idle buffers not lent
        in the last KEPT_STEPS steps go (re-entered: nothing goes now)."""
        self._alone(lambda: self._new_step(owner))

    def _new_step(self, owner):
        lent = self._kept.get(owner)
        if lent is not None:
            lent.step += 1
            kept, older_bytes = [], 0
            # the most recently lent first: the step before's stay whatever
            # their size (a step's own), older idle ones while they fit
            for entry in sorted(lent.entries, key=lambda entry: -entry[1]):
                if entry[1] < lent.step - 1 and _idle(entry):
                    if entry[1] < lent.step - self.KEPT_STEPS:
                        continue
                    older_bytes += entry[0].nbytes
                    if older_bytes > self.MAX_IDLE_BYTES:
                        continue
                kept.append(entry)
            lent.entries = kept

    def get(self, owner, shape, dtype, zero=False):
        dtype = np.dtype(dtype)
        # math.prod: np.prod of a shape tuple costs ~4.5 us, five times a step
        if math.prod(shape) * dtype.itemsize < self.BIG_BYTES:
            return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
        shape = tuple(shape)
        buf = self._alone(lambda: self._lend(owner, shape, dtype))
        if buf is None:   # re-entered: a buffer of its own
            buf = np.empty(shape, dtype)
        if zero:
            buf.fill(0)
        return buf

    def _lend(self, owner, shape, dtype):
        lent = self._kept.get(owner)
        if lent is None:
            lent = self._kept[owner] = _Lent()
        for entry in lent.entries:
            if entry[0].shape == shape and entry[0].dtype == dtype and _idle(entry):
                entry[1] = lent.step
                return entry[0]
        buf = np.empty(shape, dtype)
        lent.entries.append([buf, lent.step])
        owner._lends_buffers = True
        return buf

    def release(self, owner):
        """Let all of ``owner``'s buffers go (re-entered: at its next call);
        return their bytes."""
        return self._alone(lambda: self._release(owner)) or 0

    def _release(self, owner):
        lent = self._kept.pop(owner, None)
        owner._lends_buffers = False
        return 0 if lent is None else sum(entry[0].nbytes for entry in lent.entries)


class _Lent:
    """One owner's kept buffers: entries [buffer, the step it was last
    lent in], and the owner's current step."""
    __slots__ = ("step", "entries")

    def __init__(self):
        self.step = 0
        self.entries = []


def steps_run(T, B, lengths):
    """The steps a call of T steps with ``lengths`` runs when every sequence
    ends before its last step: up to the longest (see ``valid_steps``);
    None when all T run."""
    if lengths is None or B == 0 or T < 2:
        return None
    steps = int(lengths.max())
    return steps if 0 < steps < T else None


def first_steps(a, steps, batch_first):
    """The first ``steps`` steps of a (T, B, ...) or (B, T, ...) array, a view."""
    return a[:, :steps] if batch_first else a[:steps]


def valid_steps(run, x, steps, batch_first, out):
    """``run(x_run, out_run)`` on the first ``steps`` steps (``steps_run``)
    of a call with lengths: only they run, as PyTorch's packed sequences run
    only the valid steps, and the output past them is zeros, as padding's is
    (every step ran before: all lengths 1 in 400 steps took 38x PyTorch's
    packed call). Returns run's result."""
    x_run = np.ascontiguousarray(first_steps(x, steps, batch_first))   # (time-major: a view)
    out_run = (np.empty((out.shape[0], steps, out.shape[2]), out.dtype) if batch_first
               else out[:steps])
    result = run(x_run, out_run)
    if batch_first:
        out[:, :steps] = out_run
        out[:, steps:] = 0
    else:
        out[steps:] = 0   # (the steps run wrote out's first rows)
    return result


def transposed(w):
    """A C-contiguous copy of w.T, 64 rows of w at a time: numpy's copy of a
    transposed view walks one array across its rows and ran at 0.6 GB/s on a
    large W_hh (4096 x 1024 float32: 26 ms, 3.4 ms in blocks; 384 x 128 50
    and 19 us), done at the first call after every parameter change."""
    out = np.empty(w.shape[::-1], w.dtype)
    for start in range(0, w.shape[0], 64):
        out[:, start:start + 64] = w[start:start + 64].T
    return out


def _idle(entry):
    """Whether nothing but its entry holds entry[0] (the entry's reference
    and getrefcount's argument: 2)."""
    return sys.getrefcount(entry[0]) == 2


_training_buffers = _TrainingBuffers()
if hasattr(os, "register_at_fork"):      # (not on Windows)
    os.register_at_fork(after_in_child=_training_buffers.after_fork_in_child)


@dataclass(slots=True)
class LayerTape:
    """What BPTT needs of one layer's training forward: its input (R, D_in),
    the activations saved per step (R, dirs * S * H; see _gates.pxd.tp), the
    states before each step (R, dirs * H; c_prev LSTM only), the dropout
    mask applied to its output (None: no dropout) and the zoneout masks of h
    and c (R, dirs * H; None: none)."""
    x: np.ndarray
    acts: np.ndarray
    h_prev: np.ndarray | None
    c_prev: np.ndarray | None
    mask: np.ndarray | None = None
    zone_h: np.ndarray | None = None
    zone_c: np.ndarray | None = None
    # Keras' input and recurrent dropout: per direction, gate and batch row
    # (dirs, G, B, D_in) and (dirs, G, B, H), or None
    input_drop: np.ndarray | None = None
    recurrent_drop: np.ndarray | None = None


@dataclass(slots=True)
class Tape:
    """The record of a training forward: the parameter set it used (with
    DropConnect, the one of masked W_hh), its row order (batch-first or
    time-major), the lengths, and a LayerTape per layer. Set by the caller of
    ``_run``: ``learned_state``, whether the forward started from the learned
    initial states (their gradients are then added), and ``hh_masks``, per
    layer the DropConnect mask of W_hh (None: no DropConnect)."""
    params: ParamSet
    batch_first: bool
    lengths: np.ndarray | None
    layers: list = field(default_factory=list)
    learned_state: bool = False
    hh_masks: list | None = None
    steps: int | None = None   # the steps run (fewer than the call's: _run_steps)


class RecurrentEngine(RecurrentWeights):
    """The kernel drivers of a stack of recurrent layers (see the module
    docstring); layers and cells derive from it."""

    _lends_buffers = False   # set while _training_buffers keeps buffers for this layer

    def _kernel_weights(self, params):
        """Per layer (bias_x, bias_h, w_hh_t) as the forward kernel takes them:
        the bias added to the input projection, the GRU's recurrent bias (other
        cells, the reset-before GRU too, fold b_hh into bias_x), and W_hh
        transposed to (H, dirs * G * H). Derived from a parameter set, kept
        with it."""
        terms = params.cache.get("kernel")
        if terms is None:
            terms = []
            _, w_hh_all, b_ih_all, b_hh_all = self._weights(params)
            for b_ih, b_hh, w_hh in zip(b_ih_all, b_hh_all, w_hh_all):
                w_hh_t = transposed(w_hh)
                if b_ih is None:
                    terms.append((None, None, w_hh_t))
                elif self._base_code == _forward.CELL_GRU:
                    terms.append((b_ih, b_hh, w_hh_t))
                else:
                    terms.append((b_ih + b_hh, None, w_hh_t))
            params.cache["kernel"] = terms
        return terms

    def _recur_units(self, params, k, T, B, batch_first, units, h_k, c_k, gx, layer_out,
                     saves=None):
        """Layer k (batch 1, or a few rows: the plan's ``units``) with its
        hidden units split at the bounds ``units`` between this thread and
        workers (training: into the tape ``saves``); False if the workers
        were busy."""
        dtype = self._config["dtype"]
        per_unit = 2 * self._gates * B + self._saved
        # one buffer, the parts' work areas a cache line apart (no false sharing)
        gap = 64 // np.dtype(dtype).itemsize
        work = np.empty(per_unit * units[-1] + (len(units) - 1) * gap, dtype)
        packed = self._packed_recurrent(params)
        parts = [self._unit_weights(params, k, lo, hi, packed is None)
                 for lo, hi in zip(units, units[1:])]
        works = [work[per_unit * lo + part * gap:per_unit * hi + part * gap]
                 for part, (lo, hi) in enumerate(zip(units, units[1:]))]
        outcome = _forward.recur_units(cell=self._kernel_code, T=T, bounds=units,
                                       w_parts=[p[0] for p in parts],
                                       bias_parts=[p[1] for p in parts], works=works,
                                       h=h_k, c=c_k, gx=gx, out=layer_out,
                                       wait_ns=_plan.UNIT_SPLIT_WAIT_NS,
                                       packed=None if packed is None else packed[k],
                                       acts=None if saves is None else saves.acts,
                                       h_prev=None if saves is None else saves.h_prev,
                                       c_prev=None if saves is None else saves.c_prev,
                                       batch_first=batch_first)
        return _plan.unit_split_ran(outcome)

    def _packed(self, params, key, pack):
        """float32: ``pack(w_ih, w_hh, k)`` for every layer k, packed for the
        micro-kernel once and kept with the parameter set under ``key``;
        float64 (whose products BLAS, or at batch 1 _rowdot.h, runs): None."""
        if self._config["dtype"] != np.float32:
            return None
        packs = params.cache.get(key)
        if packs is None:
            w_ih_all, w_hh_all = self._weights(params)[:2]
            packs = params.cache[key] = [pack(w_ih, w_hh, k) for k, (w_ih, w_hh)
                                         in enumerate(zip(w_ih_all, w_hh_all))]
        return packs

    def _packed_recurrent(self, params):
        """Per layer, W_hh packed for the per-step products (_forward.pack_recurrent)."""
        H = self._config["hidden_size"]
        return self._packed(params, "packed_hh", lambda w_ih, w_hh, k: _forward.pack_recurrent(
            w_hh, self._kernel_code, H, self._dirs))

    def _packed_projection(self, params):
        """Per layer, W_ih packed per direction for the input projection
        (_forward.pack_projection)."""
        H = self._config["hidden_size"]
        return self._packed(params, "packed_ih", lambda w_ih, w_hh, k: _forward.pack_projection(
            w_ih, self._kernel_code, H, self._dirs))

    def _packed_folded(self, params):
        """Per layer, [W_ih, W_hh] packed per direction for the folded steps
        (_forward.pack_folded)."""
        H = self._config["hidden_size"]
        return self._packed(params, "packed_folded", lambda w_ih, w_hh, k: _forward.pack_folded(
            w_ih, w_hh, self._kernel_code, H, self._dirs))

    def _packed_backward(self, params):
        """Per layer, (W_hh packed for dG . W_hh (_backward.pack_backward),
        W_ih packed for dx = dG . W_ih (_backward.pack_rows))."""
        H = self._config["hidden_size"]
        return self._packed(params, "packed_backward", lambda w_ih, w_hh, k: (
            _backward.pack_backward(w_hh, self._kernel_code, H, self._dirs),
            _backward.pack_rows(w_ih, 0, w_ih.shape[0])))

    def _unit_weights(self, params, k, lo, hi, weights=True):
        """Layer k's recurrent weights for hidden units [lo, hi) of a
        unit-split call (_forward.recur_units): the rows of every gate block,
        packed (G * u, H) (None unless ``weights``: float32 multiplies W_hh
        packed whole), and the GRU's recurrent bias likewise (else None).
        Kept with the parameter set."""
        key = ("units", k, lo, hi, weights)
        if key not in params.cache:
            H = self._config["hidden_size"]
            rows = np.concatenate([np.arange(g * H + lo, g * H + hi) for g in range(self._gates)])
            w_part = np.ascontiguousarray(self._weights(params)[1][k][rows]) if weights else None
            bias_h = self._kernel_weights(params)[k][1]
            params.cache[key] = (w_part,
                                 None if bias_h is None else np.ascontiguousarray(bias_h[rows]))
        return params.cache[key]

    def _sequence_runner(self, params):
        """The layer's SequenceRunner for a parameter set (kept with it): the
        lean path of small calls, and inference in parts of the batch
        (``Plan.stack``)."""
        threads = _parallel.get_num_threads()
        key = ("runner",) + _plan._tuning(threads)   # (runner_limits reads the tuning)
        runner = params.cache.get(key)
        if runner is None:
            w_ih, w_hh = self._weights(params)[:2]
            # (a cell has no batch_first: its steps run time-major, T = 1)
            batch_first = self._config.get("batch_first", False)
            runner = params.cache[key] = _forward.SequenceRunner(
                self._kernel_code, self._dirs, batch_first, w_ih, w_hh,
                self._kernel_weights(params), *_plan.runner_limits(self, threads),
                self._packed_recurrent(params), self._packed_projection(params))
        return runner

    def _run(self, params, x, T, B, batch_first, h_n, c_n, out, lengths, train=False,
             gx_buffer=None):
        """Run every layer with the parameter set ``params`` (the caller took
        it once: ``self._params``); x is (T, B, D) or (B, T, D) C-contiguous.

        Returns None, or in training the tape backward needs: the row order and,
        per layer, its input, the saved activations and states, the dropout mask
        applied to its output. Long inference runs in time windows: a
        unidirectional stack's (_run_windows) lend every window the same input
        projection buffer (gx_buffer: at least T * B rows); a bidirectional
        one's run layer by layer (_run_windows_both_directions).
        """
        steps = steps_run(T, B, lengths)
        if steps is not None:
            return self._run_steps(params, x, steps, B, batch_first, h_n, c_n, out, lengths,
                                   train, gx_buffer)
        dtype, H = self._config["dtype"], self._config["hidden_size"]
        dirs = self._dirs
        plan = _plan.forward_plan(self, T, B, batch_first=batch_first, train=train,
                                  has_lengths=lengths is not None)
        if plan.time_major:
            # the per-step GEMM would need a leading dimension T * N beyond the
            # BLAS int range: run time-major and lay the output out at the end
            out_tm = np.empty((T, B, out.shape[2]), dtype)
            tape = self._run(params, np.ascontiguousarray(x.transpose(1, 0, 2)), T, B, False,
                             h_n, c_n, out_tm, lengths, train)
            out[...] = out_tm.transpose(1, 0, 2)
            return tape
        if plan.window is not None:
            if dirs == 1:
                self._run_windows(params, x, T, B, batch_first, h_n, c_n, out, lengths,
                                  plan.window)
            else:
                with (_parallel.blas_at_one_thread if plan.hold_blas
                      else contextlib.nullcontext()):
                    held = plan.hold_blas and _parallel.blas_at_one_thread.held
                    self._run_windows_both_directions(params, x, T, B, batch_first, h_n, c_n,
                                                      out, lengths, plan, held)
            return None
        rows = T * B
        if not train and self._lends_buffers:
            _training_buffers.release(self)
        units = plan.units if plan.units is not None and _plan.unit_split_allowed() else None
        if gx_buffer is not None:
            gx = gx_buffer[:rows]
        elif train:
            _training_buffers.new_step(self)
            gx = _training_buffers.get(self, (rows, dirs * self._gates * H), dtype)
        else:   # (layers that all fold write B rows of pre-activations, no projection)
            gx = np.empty((B if units is None and all(plan.fold) else rows,
                           dirs * self._gates * H), dtype)
        gh = (np.empty((dirs, B * self._gates * H), dtype)
              if self._base_code == _forward.CELL_GRU else None)
        layer_in = x.reshape(rows, -1)
        if train and lengths is not None:
            # padding never reaches results; zero it so that it cannot reach the
            # weight gradients either (0 * NaN is NaN)
            layer_in = layer_in.copy()
            layer_in.reshape(x.shape)[padding_mask(T, B, batch_first, lengths)] = 0
        if plan.stack and units is None:   # each part's rows through every layer
            dirs_h = dirs * H
            self._sequence_runner(params).run_stack(
                T=T, B=B, batch_first=batch_first, parts=plan.parts, x=layer_in, h=h_n, c=c_n,
                gx=gx, gh=gh, between=None if self._layers == 1 else np.empty(
                    ((2 if self._layers > 2 else 1) * rows, dirs_h), dtype),
                out=out.reshape(rows, dirs_h), acts=np.empty((B, dirs * self._saved * H), dtype),
                lengths=lengths, **self._stack_folds(params, plan.fold, B))
            return None
        tape = Tape(params, batch_first, lengths, []) if train else None
        with _parallel.blas_at_one_thread if plan.hold_blas else contextlib.nullcontext():
            held = plan.hold_blas and _parallel.blas_at_one_thread.held
            if plan.hold_blas and not held:   # the parts' per-step gemv must not be threaded
                units = None
            self._run_layers(params, layer_in, T, B, batch_first, h_n, c_n, out, lengths, train,
                             gx, gh, plan.parts, held, tape, units, plan.fold, plan.products)
        return tape

    def _run_steps(self, params, x, steps, B, batch_first, h_n, c_n, out, lengths, train,
                   gx_buffer):
        """``_run`` of a call whose sequences all end before its last step
        (see ``valid_steps``); the tape (training) says how many it holds."""
        tape = valid_steps(lambda x_run, out_run: self._run(
            params, x_run, steps, B, batch_first, h_n, c_n, out_run, lengths, train, gx_buffer),
            x, steps, batch_first, out)
        if tape is not None:
            tape.steps = steps
        return tape

    def _stack_folds(self, params, fold, B):
        """run_stack's arguments for the layers that fold their projection
        (the plan's ``fold``): their packed [W_ih, W_hh] and the scratch of
        each row's [x_t, h]; none when no layer folds."""
        if not any(fold):
            return {}
        packed = self._packed_folded(params)
        H = self._config["hidden_size"]
        widest = max(self._config["input_size"], self._dirs * H)
        dtype = self._config["dtype"]
        return {"folded": [packed[k] if folds else None for k, folds in enumerate(fold)],
                "xh": np.empty(self._dirs * B * (widest + H), dtype),
                "folded_gx": np.empty((B, self._dirs * self._gates * H), dtype)}

    def _run_windows(self, params, x, T, B, batch_first, h_n, c_n, out, lengths, window):
        """Inference of a unidirectional stack over time windows, the state
        carried from one to the next (h_n, c_n are updated in place): the
        same numbers, and memory for the input projections and the layers
        between bounded by the window, not the sequence. The windows share
        one input projection buffer (_plan.WINDOW_BYTES)."""
        gx = np.empty((min(T, window) * B, self._dirs * self._gates * self._config["hidden_size"]),
                      self._config["dtype"])
        for t0 in range(0, T, window):
            t1 = min(T, t0 + window)
            if batch_first:
                x_w = np.ascontiguousarray(x[:, t0:t1])
                out_w = np.empty((B, t1 - t0, out.shape[2]), out.dtype)
            else:
                x_w, out_w = x[t0:t1], out[t0:t1]
            # a sequence already ended is inactive for the whole window
            len_w = None if lengths is None else np.clip(lengths - t0, 0, t1 - t0)
            self._run(params, x_w, t1 - t0, B, batch_first, h_n, c_n, out_w, len_w,
                      gx_buffer=gx)
            if batch_first:
                out[:, t0:t1] = out_w

    def _run_windows_both_directions(self, params, x, T, B, batch_first, h_n, c_n, out,
                                     lengths, plan, held):
        """Inference of a bidirectional stack, each layer in time windows
        (_forward.recur_windows: each direction its windows in its own
        order, so the layers run one after the other): the same numbers
        (float64, through BLAS: within rounding), and the input projections
        bounded by the window (_plan.WINDOW_BYTES), not the sequence. A layer
        that folds its projection into the steps (the plan's ``fold``) runs
        whole: its steps write only a few rows of gx (the rest of its pages
        never touched). ``held``: BLAS is held at one thread (float64)."""
        if self._lends_buffers:
            _training_buffers.release(self)
        dtype, H, dirs, G = self._config["dtype"], self._config["hidden_size"], self._dirs, \
            self._gates
        rows = T * B
        gx = np.empty((min(T, plan.window) * B, dirs * G * H), dtype)
        gh = np.empty((dirs, B * G * H), dtype) if self._base_code == _forward.CELL_GRU else None
        acts = np.empty((B, dirs * self._saved * H), dtype)
        lengths_w = None if lengths is None else np.empty(dirs * B, np.int64)
        between = [np.empty((rows, dirs * H), dtype) for _ in range(min(2, self._layers - 1))]
        packed, packed_ih = self._packed_recurrent(params), self._packed_projection(params)
        w_ih_all, w_hh_all = self._weights(params)[:2]
        folds = self._stack_folds(params, plan.fold, B)
        # float64 batch-first: each part's window rows copied time-major (one
        # scratch for every layer, as wide as the widest input)
        xw = None if packed is not None or not batch_first else np.empty(
            len(plan.parts) * _forward.window_scratch_rows(B)
            * max(self._config["input_size"], dirs * H))
        layer_in = x.reshape(rows, -1)
        for k, (bias_x, bias_h, w_hh_t) in enumerate(self._kernel_weights(params)):
            layer_out = out.reshape(rows, -1) if k == self._layers - 1 else between[k % 2]
            if plan.fold[k]:
                _forward.recur(
                    cell=self._kernel_code, T=T, batch_first=batch_first, parts=plan.parts,
                    w_hh=w_hh_all[k], w_hh_t=w_hh_t, bias_h=bias_h, h=h_n[k * dirs:(k + 1) * dirs],
                    c=c_n[k * dirs:(k + 1) * dirs], gx=folds["folded_gx"], gh=None,
                    out=layer_out,
                    lengths=lengths, acts=acts, train=False, h_prev=None, c_prev=None,
                    blas_held=False, x=layer_in, folded=folds["folded"][k], bias_x=bias_x,
                    xh=folds["xh"][:dirs * B * (layer_in.shape[1] + H)])
                layer_in = layer_out
                continue
            float32 = packed is not None   # (float64: BLAS products)
            _forward.recur_windows(
                cell=self._kernel_code, T=T, batch_first=batch_first, window=plan.window,
                parts=plan.parts, x=layer_in, packed_ih=packed_ih[k] if float32 else None,
                w_ih=None if float32 else w_ih_all[k], bias_x=bias_x, w_hh=w_hh_all[k],
                w_hh_t=w_hh_t, bias_h=bias_h, packed=packed[k] if float32 else None,
                h=h_n[k * dirs:(k + 1) * dirs],
                c=None if c_n is None else c_n[k * dirs:(k + 1) * dirs], gx=gx, gh=gh,
                out=layer_out, lengths=lengths, lengths_w=lengths_w, acts=acts, blas_held=held,
                xw=xw)
            layer_in = layer_out

    def _run_layers(self, params, layer_in, T, B, batch_first, h_n, c_n, out, lengths, train,
                    gx, gh, parts, held, tape, units, fold, products):
        """The layers of ``_run``, in the plan's parts, or with the hidden
        units split between threads (``units``: the plan's bounds);
        ``fold``: per layer, whether its projection folds into the steps;
        ``products``: the parts of the input projections."""
        if self._ln_index:   # layer_norm=True: its own kernels (_layernorm_engine.py)
            _layernorm_engine.run_layers(self, params, layer_in, T, B, batch_first, h_n, c_n,
                                         out, lengths, train, gx, parts, tape)
            return
        if self._proj_index:   # proj_size: its own kernels (_projection_engine.py)
            _projection_engine.run_layers(self, params, layer_in, T, B, batch_first, h_n, c_n,
                                          out, lengths, train, gx, parts, tape)
            return
        dtype, H = self._config["dtype"], self._config["hidden_size"]
        L, dirs = self._layers, self._dirs
        rows = T * B
        is_lstm = self._base_code == _forward.CELL_LSTM
        saved_cols = dirs * self._saved * H
        peepholes = self._peepholes(params)
        # the peepholes' gradients read the saved c_t of every row, padding too
        zero_acts = bool(train and lengths is not None and self._peep_index)
        def buffer(shape, zero=False):
            return _training_buffers.get(self, shape, dtype, zero)
        scratch = None if train else np.empty((B, saved_cols), dtype)  # inference activations
        spare = None
        w_ih_all, w_hh_all = self._weights(params)[:2]
        for k, (bias_x, bias_h, w_hh_t) in enumerate(self._kernel_weights(params)):
            last = k == L - 1
            if last:
                layer_out = out.reshape(rows, -1)
            elif spare is not None:
                layer_out = spare
            elif train:
                layer_out = buffer((rows, dirs * H))
            else:
                layer_out = np.empty((rows, dirs * H), dtype)
            saves = LayerTape(
                x=layer_in, acts=buffer((rows, saved_cols), zero_acts) if train else scratch,
                h_prev=buffer((rows, dirs * H)) if train else None,
                c_prev=buffer((rows, dirs * H)) if train and is_lstm else None)
            if train and self._dropouts is not None:
                p_in, p_rec = self._dropouts
                G = self._gates
                if p_in > 0:
                    saves.input_drop = dropout_mask(self._rng, (dirs, G, B, layer_in.shape[1]),
                                                    p_in, dtype)
                if p_rec > 0:
                    saves.recurrent_drop = dropout_mask(self._rng, (dirs, G, B, H), p_rec,
                                                        dtype)
            folded = (units is None and fold[k]
                      and saves.input_drop is None and saves.recurrent_drop is None)
            if saves.input_drop is not None:
                self._dropped_projection(layer_in, w_ih_all[k], bias_x, gx[:rows],
                                         saves.input_drop, T, B, batch_first)
            elif folded:
                fold_args = {"x": layer_in, "folded": self._packed_folded(params)[k],
                             "bias_x": bias_x,
                             "xh": np.empty(dirs * B * (layer_in.shape[1] + H), dtype)}
            else:
                packed_ih = self._packed_projection(params)
                _forward.project(x=layer_in, w_ih=w_ih_all[k], bias_x=bias_x, gx=gx,
                                 max_rows=v.BLAS_INT_MAX, parts=_plan.chunks(rows, products),
                                 packed=None if packed_ih is None else packed_ih[k],
                                 hidden_size=H)
            h_k = h_n[k * dirs:(k + 1) * dirs]
            c_k = None if c_n is None else c_n[k * dirs:(k + 1) * dirs]
            if train and self._zoneout is not None:
                saves.zone_h, saves.zone_c = (
                    None if rate == 0 else
                    (self._rng.random((rows, dirs * H)) < rate).astype(dtype)
                    for rate in self._zoneout)

            if units is None or not self._recur_units(params, k, T, B, batch_first, units, h_k,
                                                      c_k, gx, layer_out,
                                                      saves if train else None):
                # (a folded layer's steps need no W_hh packed of its own)
                packed = None if folded else self._packed_recurrent(params)
                _forward.recur(
                    cell=self._kernel_code, T=T, batch_first=batch_first, parts=parts,
                    w_hh=w_hh_all[k], w_hh_t=w_hh_t, bias_h=bias_h, h=h_k, c=c_k,
                    gx=gx, gh=gh, out=layer_out, lengths=lengths, acts=saves.acts,
                    train=train, h_prev=saves.h_prev, c_prev=saves.c_prev,
                    blas_held=held, packed=None if packed is None else packed[k],
                    options=self._option_rows, peepholes=peepholes[k],
                    **self._zoneout_args(saves, B),
                    **self._dropout_args(saves, B, params, k, backward=False),
                    **(fold_args if folded else {}))
            if train:
                if not last and self._dropout > 0:
                    saves.mask = dropout_mask(self._rng, layer_out.shape, self._dropout, dtype)
                    layer_out = layer_out * saves.mask
                tape.layers.append(saves)
                spare = None   # every layer input is kept for backward
            else:
                # the buffer this layer read becomes the next one's output
                spare = layer_in if k > 0 else None
            layer_in = layer_out

    def _bptt(self, tape, T, B, dout, dh, dc, input_grad=True):
        """BPTT through every layer of a tape from ``_run(train=True)``.

        dout (R, dirs * H) the gradient of the top layer's output in the tape's
        row order; dh, dc (layers * dirs, B, H) the gradients of the final
        states, updated in place into those of the initial states. Adds the
        parameter gradients into ``grads`` and returns dx (R, D), or None
        without ``input_grad`` (the first layer's dx = dG . W_ih not run).
        """
        if self._ln_index:   # layer_norm=True: its own kernels (_layernorm_engine.py)
            return _layernorm_engine.bptt(self, tape, T, B, dout, dh, dc, input_grad)
        if self._proj_index:   # proj_size: its own kernels (_projection_engine.py)
            return _projection_engine.bptt(self, tape, T, B, dout, dh, dc, input_grad)
        dtype, H = self._config["dtype"], self._config["hidden_size"]
        rows, N = T * B, self._dirs * self._gates * H
        dgx = _training_buffers.get(self, (rows, N), dtype)
        dgh = (_training_buffers.get(self, (rows, N), dtype)
               if self._base_code == _forward.CELL_GRU else None)
        reset_before = self._base_code == _forward.CELL_GRU_RESET_BEFORE
        plan = _plan.backward_plan(self, T, B, tape.lengths is not None)
        hold = plan.hold_blas
        w_ih_all, w_hh_all = self._weights(tape.params)[:2]
        packed = self._packed_backward(tape.params)
        # the weight gradients of this backprop, added to ``grads`` only when
        # every layer is done: an interrupted backprop (Ctrl-C) adds nothing
        grads = (self._dw_ih, self._dw_hh, self._db_ih, self._db_hh, self._dpeep)
        sums = [[None if g is None else np.zeros(g.shape, g.dtype) for g in kind]
                for kind in grads]   # np.zeros: zeros_like costs 3x as much (~1.6 us)
        peepholes = self._peepholes(tape.params)
        with _parallel.blas_at_one_thread if hold else contextlib.nullcontext():
            held = hold and _parallel.blas_at_one_thread.held
            for k in reversed(range(self._layers)):
                dout = self._bptt_layer(k, tape, T, B, dout, dh, dc, dgx, dgh, plan, held,
                                        reset_before, w_ih_all[k], w_hh_all[k],
                                        [kind[k] if kind else None for kind in sums],
                                        None if packed is None else packed[k], peepholes[k],
                                        input_grad or k > 0)
        self._commit_grads(tape, sums, grads, dh, dc)
        return dout

    def _commit_grads(self, tape, sums, grads, dh, dc):
        """Add one backprop's sums (per kind of parameter, per layer) into the
        module's gradients ``grads`` (the same structure), at once: an
        interrupted backprop adds nothing. With DropConnect W_hh's sums are
        masked first (the forward used W_hh * mask, so dL/dW_hh =
        dL/d(W_hh * mask) * mask); a forward from the learned initial states
        adds their gradients (dh, dc: those of the initial states)."""
        if tape.hh_masks is not None:
            for total, mask in zip(sums[1], tape.hh_masks):
                total *= mask
        pairs = [(grad, total) for kind, module_grads in zip(sums, grads)
                 for total, grad in zip(kind, module_grads) if grad is not None]
        if tape.learned_state:
            pairs += self._initial_grads(dh, dc)
        with self._grad_lock:
            add_at_once(pairs)
            self._grads_zeroed = False

    def _dropconnect(self, params):
        """DropConnect (Merity et al. 2017) for one training forward: a copy of
        the parameter set whose W_hh are multiplied by a mask drawn from the
        layer's rng (one per layer, both directions' matrices; inverted
        scaling 1 / (1 - p)), and the masks. The copy has its own cache, so
        the weights packed for it serve this forward and its BPTT only; it
        keeps the version of ``params`` (a backprop still refuses to run
        once the real parameters changed)."""
        p, dtype = self._config["weight_dropout"], self._config["dtype"]
        storages = list(params.storages)
        masks = []
        for i in self._storage_index[1]:   # W_hh of each layer
            mask = dropout_mask(self._rng, storages[i].shape, p, dtype)
            storages[i] = storages[i] * mask
            masks.append(mask)
        return ParamSet(params.version, storages, self._names), masks

    def _bptt_layer(self, k, tape, T, B, dout, dh, dc, dgx, dgh, plan, held, reset_before,
                    w_ih, w_hh, sums, packed=None, peepholes=None, input_grad=True):
        """Layer k of ``_bptt`` (its weights of the tape's parameter set
        w_ih, w_hh, peepholes): the backward time loops in the plan's parts,
        then the weight gradients (into ``sums``: dw_ih, dw_hh, db_ih, db_hh,
        dpeep) and the input gradient in its product parts (None without
        ``input_grad``)."""
        dirs, rows, parts = self._dirs, T * B, plan.parts
        saves = tape.layers[k]
        if k < self._layers - 1 and saves.mask is not None:
            dout = dout * saves.mask

        if not self._backward_units(plan, k, T, tape, saves, dout, dh, dc, dgx, dgh, packed):
            _backward.backward_layer(
                cell=self._kernel_code, T=T, batch_first=tape.batch_first, parts=parts,
                acts=saves.acts, h_prev=saves.h_prev, c_prev=saves.c_prev,
                w_hh=w_hh, dout=dout,
                dh=dh[k * dirs:(k + 1) * dirs],
                dc=None if dc is None else dc[k * dirs:(k + 1) * dirs],
                dgx=dgx, dgh=dgh, lengths=tape.lengths, blas_held=held,
                packed=None if packed is None else packed[0], options=self._option_rows,
                peepholes=peepholes, **self._zoneout_args(saves, B),
                **self._dropout_args(saves, B, tape.params, k, backward=True),
                option_scratch=None if self._option_rows is None else np.empty(
                    len(parts) * dirs * _backward.OPTION_SCRATCH_UNITS
                    * self._config["hidden_size"], self._config["dtype"]))
        if peepholes is not None:
            self._peephole_grads(saves, dgx, sums[4])
        if saves.input_drop is not None or saves.recurrent_drop is not None:
            return self._dropped_grads(saves, T, B, tape.batch_first, dgx, dgh, w_ih, sums,
                                       reset_before, input_grad)
        activations = None
        if packed is not None:   # the sums over rows on the micro-kernel
            activations = self._packed_activations(saves, rows, self._config["hidden_size"],
                                                   reset_before)
        _backward.weight_grads(
            parts=_plan.chunks(dgx.shape[1], plan.products), x=saves.x,
            h_prev=saves.h_prev, reset_acts=saves.acts if reset_before else None,
            dgx=dgx, dgh=dgh, dw_ih=sums[0], dw_hh=sums[1], db_ih=sums[2], db_hh=sums[3],
            max_rows=v.BLAS_INT_MAX, packed=activations)
        if not input_grad:
            return None
        dx = np.empty((rows, w_ih.shape[1]), self._config["dtype"])
        _backward.input_grad(dgx=dgx, w_ih=w_ih, dx=dx, max_rows=v.BLAS_INT_MAX,
                             parts=_plan.chunks(rows, plan.products),
                             packed=None if packed is None else packed[1])
        return dx

    def _packed_activations(self, saves, rows, width, reset_before=False):
        """What a layer's weight gradients sum over, packed for the
        micro-kernel (``_backward.weight_grads``' ``packed``): its input, each
        direction's h_{t-1} (``width`` columns each) and the reset-before
        GRU's r * h_{t-1} of each direction; in training buffers, lent again
        at the next step (fresh ones of 19 MB each, GRU 800->800 at B=20,
        T=300, took ~30 ms of page faults a step)."""
        H, pack = self._config["hidden_size"], self._packed_rows
        return (pack(saves.x, rows),
                [pack(saves.h_prev, rows, d * width, width) for d in range(self._dirs)],
                [pack(saves.acts, rows, (d * self._saved + 3) * H, H) for d in range(self._dirs)]
                if reset_before else None)

    def _packed_rows(self, a, rows, col0=0, cols=-1):
        """``_backward.pack_rows`` of a's first rows into a training buffer."""
        size = _backward.pack_rows_size(rows, a.shape[1] - col0 if cols < 0 else cols)
        return _backward.pack_rows(a, 0, rows, col0, cols,
                                   buffer=_training_buffers.get(self, (size,), np.float32))

    def _backward_units(self, plan, k, T, tape, saves, dout, dh, dc, dgx, dgh, packed):
        """Layer k's BPTT time loop (batch 1, or a few rows) with its hidden
        units split between this thread and workers (float32, the plan's
        units); False if it did not run (then ``backward_layer``)."""
        if plan.units is None or packed is None or not _plan.unit_split_allowed():
            return False
        return _plan.unit_split_ran(_backward.backward_units(
            cell=self._kernel_code, T=T, bounds=plan.units, acts=saves.acts,
            h_prev=saves.h_prev, c_prev=saves.c_prev, dout=dout, dh=dh[k:k + 1],
            dc=None if dc is None else dc[k:k + 1], dgx=dgx, dgh=dgh, packed=packed[0][0],
            wait_ns=_plan.UNIT_SPLIT_WAIT_NS, batch_first=tape.batch_first))

    # --- Keras' input and recurrent dropout (per gate masks), training only ---
    def _dropout_args(self, saves, B, params, k, backward):
        """The kernels' recurrent dropout arguments for layer k (none
        without): the masks (dirs, G, B, H), a scratch and (float32) its W_hh
        packed per gate block, for the forward's or BPTT's products."""
        if saves is None or saves.recurrent_drop is None:
            return {}
        H, kind = self._config["hidden_size"], self._kernel_code
        if backward:
            packs = self._packed(params, "packed_gate_rows", lambda w_ih, w_hh, k:
                                 _backward.pack_gate_rows(w_hh, kind, H, self._dirs))
        else:
            packs = self._packed(params, "packed_gates", lambda w_ih, w_hh, k:
                                 _forward.pack_gates(w_hh, kind, H, self._dirs))
        return {"dropout_masks": saves.recurrent_drop,
                "dropout_packs": None if packs is None else packs[k],
                "dropout_scratch": np.empty(self._dirs * B * H, self._config["dtype"])}

    @staticmethod
    def _row_batch(T, B, batch_first):
        """The batch row of each row of a (T * B, ...) buffer in its order."""
        return np.arange(T * B) // T if batch_first else np.arange(T * B) % B

    def _dropped_projection(self, x, w_ih, bias_x, gx, masks, T, B, batch_first):
        """gx = the input projection with Keras' input dropout: gate block g
        of direction d reads x * masks[d, g] (its batch row's mask), through
        BLAS, one product per gate."""
        GH = self._gates * self._config["hidden_size"]
        H = self._config["hidden_size"]
        rows = self._row_batch(T, B, batch_first)
        for d in range(self._dirs):
            for g in range(self._gates):
                cols = slice(d * GH + g * H, d * GH + (g + 1) * H)
                gx[:, cols] = _parallel.matmul(x * masks[d, g][rows], w_ih[cols].T)
        if bias_x is not None:
            gx += bias_x

    def _dropped_grads(self, saves, T, B, batch_first, dgx, dgh, w_ih, sums, reset_before,
                       input_grad=True):
        """The weight gradients (into sums) and dx of a layer trained with
        Keras' input or recurrent dropout: the kernels' sums over rows
        (_backward.weight_grads) one gate block at a time, each over its own
        masked input and state (BLAS at one thread); dx one product when the
        input is not dropped, else per gate block (None without
        ``input_grad``)."""
        H, dtype = self._config["hidden_size"], self._config["dtype"]
        GH, R, dirs = self._gates * H, T * B, self._dirs
        rows = self._row_batch(T, B, batch_first)
        x = saves.x
        # direction d's slot holds the state gate g read (the other slot unused)
        h_in = saves.h_prev if saves.recurrent_drop is None else np.empty((R, dirs * H), dtype)
        float32 = dtype == np.float32   # the sums on the micro-kernel over packed rows

        def packed(a, col0=0, cols=-1):
            return self._packed_rows(a, R, col0, cols) if float32 else None

        x_packed = None if saves.input_drop is not None else packed(x)
        with _parallel.blas_at_one_thread:
            for d in range(dirs):
                # the reset-before GRU's W_hn read r * (h * mask_n), saved in acts
                rh = packed(saves.acts, d * self._saved * H + 3 * H, H) if reset_before else None
                for g in range(self._gates):
                    lo = d * GH + g * H
                    x_in = x if saves.input_drop is None else x * saves.input_drop[d, g][rows]
                    if saves.recurrent_drop is not None:
                        np.multiply(saves.h_prev[:, d * H:(d + 1) * H],
                                    saves.recurrent_drop[d, g][rows],
                                    out=h_in[:, d * H:(d + 1) * H])
                    on_rh = reset_before and g == 2
                    activations = None
                    if float32:   # (only direction d's are read)
                        activations = (packed(x_in) if x_packed is None else x_packed,
                                       [packed(h_in, d * H, H)] * dirs,
                                       [rh] * dirs if on_rh else None)
                    _backward.weight_grads(
                        parts=[(lo, lo + H)], x=x_in, h_prev=h_in,
                        reset_acts=saves.acts if on_rh else None,
                        dgx=dgx, dgh=dgh, dw_ih=sums[0], dw_hh=sums[1], db_ih=sums[2],
                        db_hh=sums[3], max_rows=v.BLAS_INT_MAX, packed=activations)
            if not input_grad:
                return None
            if saves.input_drop is None:
                dx = np.empty((R, w_ih.shape[1]), dtype)
                _backward.input_grad(dgx=dgx, w_ih=w_ih, dx=dx, max_rows=v.BLAS_INT_MAX,
                                     parts=[(0, R)])
                return dx
        dx = np.zeros((R, w_ih.shape[1]), dtype)
        for d in range(dirs):
            for g in range(self._gates):
                cols = slice(d * GH + g * H, d * GH + (g + 1) * H)
                dx += _parallel.matmul(dgx[:, cols], w_ih[cols]) * saves.input_drop[d, g][rows]
        return dx

    def _zoneout_args(self, saves, B):
        """The kernels' zoneout arguments for one layer (none without zoneout):
        the rates, a training forward's masks (saves), a scratch."""
        if self._zoneout is None:
            return {}
        return {"zoneout": self._zoneout, "zone_mask_h": saves.zone_h,
                "zone_mask_c": saves.zone_c,
                "zone_keep": np.empty(self._dirs * B * 2 * self._config["hidden_size"],
                                      self._config["dtype"])}

    def _peephole_grads(self, saves, dgx, dpeep):
        """dP_i, dP_f, dP_o (into dpeep, (dirs * 3 * H,)): the sums over rows of
        dG_i * c_{t-1}, dG_f * c_{t-1} and dG_o * c_t (dG is zero on padding)."""
        H, S = self._config["hidden_size"], self._saved * self._config["hidden_size"]
        G = self._gates * H
        for d in range(self._dirs):
            c_prev = saves.c_prev[:, d * H:(d + 1) * H]
            c_t = saves.acts[:, d * S + 4 * H:d * S + 5 * H]
            block = dgx[:, d * G:(d + 1) * G]
            out = dpeep[d * 3 * H:(d + 1) * 3 * H]
            out[:H] += _parallel.column_sums(block[:, :H], c_prev)
            out[H:2 * H] += _parallel.column_sums(block[:, H:2 * H], c_prev)
            out[2 * H:] += _parallel.column_sums(block[:, 3 * H:], c_t)


class Backprop:
    """The backward of one ``forward_train`` call of a layer.

    ``dx, dhx = backprop(dout, dstate=None)``; see ``forward_train``. It keeps
    its own saved tensors (never the arrays returned to the caller, who may
    change those), so several can be alive at once, and it can run once.
    """

    def __init__(self, module, call, tape):
        self._module = module
        self._tape = tape
        self._T, self._B, self._batched = call.T, call.B, call.batched
        self._batch_first = call.batch_first
        self._x_shape = call.x.shape if call.batched else (call.T, call.x.shape[-1])
        self._out_shape = call.out.shape if call.batched else (call.T, call.out.shape[-1])
        # per state (h, and c for an LSTM; with proj_size h is the narrower)
        self._state_shapes = [s.shape if call.batched else (s.shape[0], s.shape[2])
                              for s in (call.h_n, call.c_n) if s is not None]
        # the parameter set of the forward; None for an empty batch (no tape)
        self._params = None if tape is None else tape.params
        self._version = module._version if tape is None else self._params.version
        self._used = False
        self._failed = None   # what stopped the run that used the tape, if one did
        self._lock = ForkSafeLock()

    def __call__(self, dout, dstate=None):
        module = self._module
        owner = f"{type(module).__name__}.backprop"
        cfg = module._config
        dtype, has_c = cfg["dtype"], module._base_code == _forward.CELL_LSTM
        if dout is None:   # (a cell's backprop takes None parts: a layer's output is one array)
            raise TypeError(f"{owner}: expected dout, the gradient of the output, as an array, "
                            f"got None; pass zeros where the loss reads only the state")
        dout = v.as_float_array(owner, "dout", dout, dtype)
        if dout.shape != self._out_shape:
            raise ValueError(f"{owner}: expected dout of the output's shape "
                             f"{shape_str(self._out_shape)}, got {shape_str(dout.shape)}")
        names = ("dh_n", "dc_n") if has_c else ("dh_n",)
        T, B = self._T, self._B
        full = [(shape[0], B, shape[-1]) for shape in self._state_shapes]
        grads = v.state_arrays(owner, "dstate", dstate, names, self._state_shapes, dtype,
                               full_shape=full, optional_parts=True)
        dh, dc = grads[0], (grads[1] if has_c else None)
        with self._lock:
            if self._failed:
                raise RuntimeError(f"{owner}: an earlier call of this backprop stopped "
                                   f"({self._failed}) and its saved activations went with it; "
                                   f"call forward_train again")
            if self._used:
                raise RuntimeError(f"{owner}: this backprop has already run; call "
                                   f"forward_train again for another backward pass")
            if module._version != self._version:
                raise RuntimeError(f"{owner}: the parameters changed after forward_train "
                                   f"(load_state_dict or an optimizer step); the saved "
                                   f"activations no longer match them")
            self._used = True
            tape, self._tape = self._tape, None  # free the saves when done
        if B == 0:
            dx = np.zeros(self._x_shape, dtype)
        else:
            if not self._batched:
                dout = dout[:, None, :]
            # to the tape's row order (it differs only on the huge batch-first route)
            tape_bf = tape.batch_first
            if tape_bf != self._batch_first:
                dout = dout.transpose(1, 0, 2)
            # the steps the forward ran (past every sequence's end: none of them)
            steps = T if tape.steps is None else tape.steps
            if steps < T:
                dout = first_steps(dout, steps, tape_bf)
            try:
                dx = module._bptt(tape, steps, B,
                                  np.ascontiguousarray(dout).reshape(steps * B, -1), dh, dc,
                                  _input_grad_wanted.get())
            except BaseException as exc:   # MemoryError, Ctrl-C
                self._failed = type(exc).__name__
                raise
            if dx is None:   # (input_grads(False): zeros, never computed nor touched)
                dx = np.zeros(self._x_shape, dtype)
            else:
                dx = self._input_shaped(dx, steps, tape_bf)
        dh = dh.reshape(self._state_shapes[0])
        dc = None if dc is None else dc.reshape(self._state_shapes[1])
        return dx, ((dh, dc) if has_c else dh)

    def _input_shaped(self, dx, steps, tape_bf):
        """dx (steps * B rows in the tape's order) shaped as the input was,
        the steps not run (past every sequence's end) zero."""
        T, B = self._T, self._B
        dx = dx.reshape((B, steps, -1) if tape_bf else (steps, B, -1))
        if steps < T:   # padding's gradient is zero
            full = np.zeros((B, T, dx.shape[2]) if tape_bf else (T, B, dx.shape[2]), dx.dtype)
            first_steps(full, steps, tape_bf)[...] = dx
            dx = full
        if tape_bf != self._batch_first:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        return dx.reshape(self._x_shape)


# False while Sequential runs the backprops of its first layers, whose input
# gradient it discards (input_grads)
_input_grad_wanted = contextvars.ContextVar("fastrnn_input_grad_wanted", default=True)


@contextlib.contextmanager
def input_grads(wanted):
    """Within ``input_grads(False)`` a layer's backprop does not compute the
    gradient of its first layer's input (dx = dG . W_ih, a product as large
    as the weight gradient of W_ih) and returns zeros as dx: for the
    backprops whose dx the caller throws away, as ``Sequential``'s training
    step does with its first layers' (Keras and PyTorch compute no gradient
    of the data); ``input_grads(True)`` for those whose dx is read, whatever
    the context around."""
    token = _input_grad_wanted.set(bool(wanted))
    try:
        yield
    finally:
        _input_grad_wanted.reset(token)


def padding_mask(T, B, batch_first, lengths):
    """Boolean (T, B) (or (B, T)) mask of the padded steps."""
    mask = np.arange(T)[:, None] >= lengths[None, :]
    return mask.T if batch_first else mask
