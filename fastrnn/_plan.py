"""The plan of a layer call: every dispatch decision in one place.

How a call flows. A layer or cell call validates its arguments (layers.py,
cells.py), takes one parameter set (``_module.ParamSet``) and asks this module
how to run: :func:`forward_plan` for inference and the training forward,
:func:`backward_plan` for BPTT, :func:`runner_limits` for the lean path of
small calls (``_forward.SequenceRunner``, which applies the same limits in C
without building a plan). A :class:`Plan` says

- ``parts``: what each thread runs, (first direction, last direction + 1,
  first batch row, last batch row + 1) per part, one part per thread; the
  directions and batch rows of a layer are independent recurrences, so each
  part runs its whole time loop with no per-step synchronisation;
- ``units``: at batch 1 (or a few rows over a large float32 W_hh:
  UNIT_SPLIT_MAX_ROWS), the hidden-unit bounds [0, b_1, ..., H] of the
  threads (up to one part each) that meet at a barrier after every step
  (a float32 forward at batch 1: each part waits for another only before
  reading its units of h; ``_forward.recur_units``, in inference and the
  training forward;
  ``_backward.backward_units`` in float32 BPTT, the bounds on W_hh's column
  groups there), or None;
- ``hold_blas``: whether scipy's BLAS must be held at one thread (float64
  only: float32 calls no BLAS);
- ``window``: steps per time window of a long inference (memory bounded
  by the window), or None: a unidirectional stack's windows carry the state
  through every layer; a bidirectional layer's (``_forward.recur_windows``)
  run each direction in its own order, one layer after the other;
- ``time_major``: a batch-first call whose per-step products would need a
  leading dimension beyond the BLAS int range runs time-major instead;
- ``fold``: per layer, whether its input projection is folded into the
  step's product (float32, the plain LSTM; see FOLD_MAX_BYTES);
- ``products``: how many parts the one-off products over all of a call's
  rows run in (the input projection; BPTT's weight and input gradients):
  the thread count once they are worth splitting, even where the
  recurrence runs in one part (batch 1), else as many as ``parts``.
- ``stack``: float32 inference in parts that are ranges of the batch:
  each part takes its rows through every layer (one or more), projections
  included (``_forward.SequenceRunner.run_stack``), one dispatch a call.

``_engine.RecurrentEngine`` then packs the weights once per parameter set
(``_forward.pack_recurrent`` / ``pack_projection`` / ``pack_folded``,
``_backward.pack_*``) and
hands the plan's parts to the kernels (``_forward.project``, ``recur``,
``recur_units``; ``_backward.backward_layer`` or ``backward_units``, ``weight_grads``,
``input_grad``), which run them on the calling thread and the pool of
``_worker.h`` and call the micro-kernels of ``_microkernel.h`` (float32) or
BLAS (float64) on each part's rows.

A plan depends only on the call's shape class, the layer's configuration,
the thread count and the tuning constants below, not on the parameter
values: plans are kept in one bounded cache keyed by all of these.

Reduced-precision calls (``fastrnn.quantize``) ask :func:`quantized_plan`
(cached the same way): parts per thread (``_quant.forward``), or at batch 1
(and in int8 for a few rows over large weights: QUANT_UNIT_SPLIT_MAX_ROWS)
the units of the threads, which meet after every step
(``_quant.forward_units``); their small calls take the lean path of
``_quant.QRunner``, within :func:`quantized_runner_limits`.

The tuning constants of the Python side live here, each with the
measurement that set it (those of the C side: ``_microkernel.h``, tile and
block sizes; ``_worker.h``, spin times; ``_forward.pyx.tp``, the BLAS bounds).
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from fastrnn import _parallel
from fastrnn import _validation as v
from fastrnn._kernels import forward as _forward


# --- tuning constants ---------------------------------------------------------------

# Below this many multiply-adds (plus gate work) a recurrence runs in one
# thread: handing a part to a worker costs tens of microseconds.
MIN_PARALLEL_WORK = 4_000_000

# A batch-1 unidirectional layer (or one of a few rows over a large W_hh:
# UNIT_SPLIT_MAX_ROWS below) splits its hidden units between threads,
# which meet at a barrier after every step, when a step has at least
# UNIT_SPLIT_MIN_MACS recurrent multiply-adds and the call UNIT_SPLIT_MIN_WORK.
# The barrier and the exchange of h cost ~1 us per step on this 2-core VM
# (LSTM 16->32 T=100: 52 us in one thread, 148 us split; GRU 64->128: 424 vs
# 483 us; GRU 64->256: 1230 vs 950 us). With more threads, each part keeps at
# least half of UNIT_SPLIT_MIN_MACS a step (as each of the two halves does):
# a choice, not a measurement (this machine has 2 cores); batch-1 weights
# beyond one core's L2 (a GRU of 1024 units: 12 MB) are where more parts pay.
# It stays above _tuning.h's FASTRNN_AXPY_MAX: every float64 layer that may
# split then multiplies by _gates.dot_rows_product in one thread too, so the
# split changes no bit (tests/test_unit_split.py).
UNIT_SPLIT_MIN_MACS = 131072
UNIT_SPLIT_MIN_WORK = 1_000_000
# A float32 call of 2 to UNIT_SPLIT_MAX_ROWS - 1 batch rows (unidirectional,
# no lengths) splits its hidden units too, not its rows, where its W_hh
# takes UNIT_SPLIT_MIN_BYTES or more (beyond one core's L2): each part of a
# row split streams all of W_hh every step, over few rows, each part of a
# unit split its share over all of them. Measured 2026-12-06 at 2 threads
# (Xeon, L2 2 MB a core), in-process A/B, 3 rounds, min: inference, LSTM 512
# (4.2 MB) B=8 T=200 39.6 -> 26.1 ms, B=20 66.7 -> 56.2, B=31 52.3 -> 43.0;
# LSTM 384 (2.4 MB) B=4 25.3 -> 11.6, B=16 36.0 -> 28.8; GRU 512 (3.1 MB)
# B=20 49.3 -> 41.2; GRU 800 B=20 T=300 (the bench's ds2-b20) 177 -> 149,
# B=4 92 -> 51; LSTM 1024 B=8 78 -> 58; at 40 to 64 rows within 7% either
# way; over 1 MB or less (LSTM 256, GRU 256, LSTM 128) 0.9-1.1x. Training
# steps: LSTM 512 B=8 108 -> 81 ms, LSTM 384 B=4 64 -> 38, GRU 512 B=20
# 154 -> 147, GRU 800 B=20 528 -> 489.
UNIT_SPLIT_MAX_ROWS = 32
UNIT_SPLIT_MIN_BYTES = 2 << 20
# How long a unit split waits for the worker to take its part before the
# layer runs in one thread instead (a worker asleep may take that long to
# wake on a virtual machine; a split step is >= ~10 us).
UNIT_SPLIT_WAIT_NS = 200_000
# After a split whose parts kept waiting for each other (they had no core
# each: the machine was busy), the next batch-1 calls run in one thread: 1
# after the first such split, then twice as many after each further one in
# a row, at most UNIT_SPLIT_BACKOFF; a split that ran clean starts over.
# A machine that stays busy thus pays a contended split once in 17 calls,
# while one that was briefly busy loses a single call. (A fixed 16 after
# every contended split: the first call after a 0.25 s pause was often
# read as contended on the VM of 2026-12-02, its worker's vCPU waking
# slowly, so a GRU 64->256 at B=1, T=1000 ran in one thread 6.2 ms at the
# median of blocks of 5 calls after a pause, against 4.4 ms for every call
# split. Contention was then counted in yields; _worker.run_team now
# times the waits.)
UNIT_SPLIT_BACKOFF = 16

# Inference runs in time windows whose input projection buffer (reused from
# window to window) takes about WINDOW_BYTES, and at least MIN_WINDOW_STEPS
# steps. Measured (LSTM 256->512, B=64, T=100, 2 threads): a whole-sequence
# buffer of 52 MB, or windows of at least 64 steps (33 MB), 92 ms a call, the
# fresh pages' faults and zeroing ~10% of it and the buffer far out of
# cache; 4 MB windows of 4+ steps, 55 ms; 1-8 MB windows alike, and no change
# on the smaller cases of the bench grid. (Bidirectional layers: see
# _windows_both_directions.)
WINDOW_BYTES = 4 << 20
MIN_WINDOW_STEPS = 4
# A float64 bidirectional layer's windows project through BLAS a window and
# a direction a call (a batch-first input copied time-major 256 rows at a
# time first), where the whole sequence's projection is one call for both
# directions: measured 2026-12-07 against the whole sequence, batch-first,
# LSTM 64->128 two layers B=1 T=1000 (8 MB of projections; in process, min
# of 6 rounds) 1.04-1.07x slower at 1 thread, 1.06-1.08x at 2; in
# alternating processes against the build before, LSTM 128->256 B=32 T=300
# (157 MB) 0.93-0.95x the time at both, GRU 32->64 two layers B=16 T=2000
# (98 MB; peak memory 156 -> 67 MiB) 0.97-1.02x. So float64 runs in windows
# only where the projection would take this much.
FLOAT64_WINDOWS_MIN_BYTES = 32 << 20

# A plain float32 LSTM (inference and training) folds a layer's input
# projection into the step's product (_forward._folded_product: each step
# copies its rows' [x_t, h] and multiplies them by [W_ih, W_hh], instead of
# the projection of a whole time window written out, evicted from L2, and
# read back step by step) when [W_ih, W_hh] packed takes at most
# FOLD_MAX_BYTES, so that it stays in L2 beside the step's rows, and a row's
# [x_t, h] (the copy) is no wider than its gates (the pre-activations it
# saves writing out and reading back): D + H <= G * H, which an Elman RNN
# (G = 1) never meets. Measured 2026-12-02, in-process A/B over 8
# alternating rounds (min), float32 inference, three sittings: LSTM 32->64
# B=256 T=50 1.08-1.27x at 1 thread, 1.05-1.22x at 2; LSTM 64->128 B=32
# T=100 1.01-1.06x / 0.96-1.22x; LSTM 125->100 B=64 1.05-1.14x / 0.99-1.07x;
# RNN 64->128 B=32 0.96-1.15x / 0.97-0.98x; LSTM 510->32 B=500 T=5 0.88-0.95x.
FOLD_MAX_BYTES = 512 << 10

# (Plan.stack, each part's rows through every layer, has no tuning of its
# own; measured 2026-12-04 at 2 threads, float32 inference, third best of 10
# alternating rounds, against the projection, then the time loops, of each
# layer in parts: batch-first RNN 1->50 two layers B=32 T=50 0.91x, GRU
# 64->128 two layers B=32 T=100 0.88x, GRU 125->100 two layers B=64 T=150
# 0.95x, LSTM 256->256 two layers B=8 T=300 0.95x; time-major, each batch
# row's steps projected B rows apart (now chunks of steps: _tuning.h,
# FASTRNN_PROJECTION_TILE_ROWS), 0.91x, 0.96x, LSTM 256->256 B=8
# 0.85x, RNN 64->256 three layers B=64 0.98x; one time-major layer: GRU
# 64->128 B=32 0.98x, RNN 64->128 B=32 0.97x, GRU 125->100 B=64 0.96x,
# GRU 800->800 B=20 0.97-0.98x, LSTM 510->32 B=500 T=5 0.94x, LSTM
# 256->512 B=64 1.00x; LSTMs folding their projections: 64->128 two layers
# B=32 0.99x (batch-first 0.95x), one layer 0.99x, 32->64 B=256 0.99x.)

# Reduced-precision inference (fastrnn.quantize; _quant.forward):
# below QUANT_DIRECT_WORK (the work estimate of quantized_plan) a one-part
# call runs on the calling thread without the parts' dispatch: about 8 us
# of the 20 us a batch-1 LSTMCell(64, 128)-sized call took (measured
# 2026-12-01). A unidirectional stack runs in time windows whose input
# projections take at most QUANT_WINDOW_BYTES, read back from the caches.
QUANT_DIRECT_WORK = 1 << 22
QUANT_WINDOW_BYTES = 512 << 10
# the quantized kernels' column groups (_qkernel.h: 4 blocks of 16): a
# unit split gives the first thread whole groups of every gate
QUANT_UNIT_GROUP = 64
# At 2 threads an int8 call of 2 to QUANT_UNIT_SPLIT_MAX_ROWS - 1 batch rows
# (unidirectional, no lengths) splits its hidden units, not its rows, where
# its packed W_hh takes QUANT_UNIT_SPLIT_MIN_BYTES or more (twice that
# without AMX): halves of fewer than 16 rows would leave the AMX tiles for
# VNNI, and each thread would stream all of W_hh through its L2 every
# step, where with the units split each streams its half. Measured
# 2026-12-03 (2 threads, min of 24 calls, the split against the rows'):
# AMX, GRU 800->800 B=20 T=300 (the bench's ds2-b20, W_hh 1.9 MB) 46.2 ->
# 28.3 ms, GRU 768 B=20 39.4 -> 25.2, GRU 512 B=20 4.46 -> 3.39, LSTM 512
# B=8, 20, 30 1.13x, 1.30x, 1.31x; LSTM 384 B=20 (576 KB) 3.32 -> 3.41
# (none); LSTM 512 B=32 6.35 -> 6.82 and B=64 9.4 -> 14.0 (slower: both
# halves on the tiles); LSTM 256 B=8 34 -> 48 (slower). VNNI: GRU 768 B=20
# 52.0 -> 39.7, LSTM 512 B=20 7.63 -> 8.41 (slower). bfloat16 (AMX): GRU
# 768 B=20 1.12x, LSTM 512 B=20 none: left to the row split. With more
# threads the units split in as many parts as unit_bounds gives (a choice,
# not a measurement: this machine has 2 cores; each part then streams a
# smaller share of W_hh, where the rows' parts would each stream all of it).
QUANT_UNIT_SPLIT_MAX_ROWS = 32
QUANT_UNIT_SPLIT_MIN_BYTES = 768 << 10
QUANT_UNIT_SPLIT_DTYPES = ("int8",)

# Plans kept at most (one per shape class; a new shape past this clears them).
PLAN_CACHE_SIZE = 512


class Plan(NamedTuple):
    parts: list
    units: list | None
    hold_blas: bool
    window: int | None
    time_major: bool
    fold: tuple = ()     # per layer: its input projection folded into the steps
    products: int = 1    # parts of the one-off products over all rows
    stack: bool = False  # each part takes its rows through every layer


# --- the decisions --------------------------------------------------------------------

def split(dirs, batch, work):
    """Parts (d_lo, d_hi, b_lo, b_hi) to run at once, one per thread: the
    directions, each cut into ranges of the batch; everything in one part
    below MIN_PARALLEL_WORK."""
    n = _plan_threads()
    if n < 2 or work < MIN_PARALLEL_WORK:
        return [(0, dirs, 0, batch)]
    per_direction = max(1, min(n // dirs, batch))
    dir_ranges = [(d, d + 1) for d in range(dirs)] if n >= dirs else [(0, dirs)]
    parts = [(d_lo, d_hi, lo, hi) for d_lo, d_hi in dir_ranges
             for lo, hi in chunks(batch, per_direction)]
    return parts if len(parts) > 1 else [(0, dirs, 0, batch)]


def chunks(n, count):
    """[0, n) cut into ``count`` contiguous ranges as even as can be."""
    count = max(1, min(count, n)) if n > 0 else 1
    return [(k * n // count, (k + 1) * n // count) for k in range(count)]


def product_parts(layer, parts, macs):
    """How many parts a call's one-off products over all its rows run in
    (``Plan.products``; macs: their multiply-adds in the widest layer): the
    thread count from MIN_PARALLEL_WORK on, whatever the recurrence's
    parts; a batch-1 call's recurrence runs in one part (or its units
    split), but its products over T rows split as well as any (GRU 64->256,
    B=1, T=1000, training at 2 threads took longer than at 1 when they ran
    in one part). Layer norm and projection layers (their own engines) keep
    the recurrence's parts."""
    threads = _plan_threads()
    if (threads > 1 and macs >= MIN_PARALLEL_WORK
            and not layer._ln_index and not layer._proj_index):
        return max(threads, len(parts))
    return len(parts)


def halves(n, parts):
    """[0, n) (rows or columns of a large product) in as many contiguous
    ranges as there are parts."""
    return chunks(n, len(parts))


def unit_split_steps(H, gates, threads=None):
    """The fewest steps from which a batch-1 (or few-rows) unidirectional
    layer splits its hidden units, or None if it never does (one thread, or
    small steps); threads: the thread count read by the caller (None: read
    here)."""
    macs = gates * H * H
    if threads is None:
        threads = _plan_threads()
    if threads < 2 or macs < UNIT_SPLIT_MIN_MACS:
        return None
    return max(2, -(-UNIT_SPLIT_MIN_WORK // macs))


def unit_bounds(T, H, gates, group):
    """Bounds [0, b_1, ..., H] of the threads' hidden units for a batch-1
    unidirectional layer (or one of a few rows: UNIT_SPLIT_MAX_ROWS,
    QUANT_UNIT_SPLIT_MAX_ROWS), part p the units [b_p, b_p+1), or None when
    it runs in one thread. As many parts as threads, as long as each keeps
    UNIT_SPLIT_MIN_MACS / 2 recurrent multiply-adds a step; the bounds fall
    on multiples of ``group`` (the micro-kernel's units per packed group; 1
    for the BLAS path) and of 16 (whole float32 cache lines for each part's
    units)."""
    steps = unit_split_steps(H, gates)
    if steps is None or T < steps:
        return None
    quantum = math.lcm(16, group)
    parts = min(_plan_threads(), -(-H // quantum),   # (the last may be short)
                gates * H * H // max(1, UNIT_SPLIT_MIN_MACS // 2))
    # (halves round up)
    bounds = sorted({min(H, int(p * H / parts / quantum + 0.5) * quantum)
                     for p in range(parts)} | {H})
    return bounds if len(bounds) > 2 else None


_backoff = 0            # unit-split calls left to split their rows or run in one thread
_contended_in_a_row = 0


def unit_split_contended():
    """A unit split found the other thread without a core: back off, for
    twice as many calls as last time if the last split was contended too."""
    global _backoff, _contended_in_a_row
    _contended_in_a_row = min(_contended_in_a_row + 1, 30)
    _backoff = min(UNIT_SPLIT_BACKOFF, 1 << (_contended_in_a_row - 1))


def unit_split_ran_clean():
    """A unit split ran without waiting: the next contention backs off
    for one call again."""
    global _contended_in_a_row
    _contended_in_a_row = 0


def unit_split_ran(outcome):
    """Whether a unit split ran, from its kernel's outcome (0: the worker
    was busy, nothing done; 1: done; 2: done, but contended), backing off
    after a contended one."""
    if outcome == 2:
        unit_split_contended()
    elif outcome == 1:
        unit_split_ran_clean()
    return outcome != 0


def unit_split_allowed():
    """Whether this call may split its units (not while backing off)."""
    global _backoff
    if _backoff > 0:   # unsynchronised: a lost update costs one call's choice
        _backoff -= 1
        return False
    return True


def window_steps(B, N, dtype):
    """Steps per window of a long inference (N: the input projection's
    columns, every direction's), at most BLAS' int range of rows (a float64
    window's projection is one BLAS call: _forward's _window_projection)."""
    steps = max(MIN_WINDOW_STEPS, WINDOW_BYTES // max(1, B * N * np.dtype(dtype).itemsize))
    return min(steps, max(1, v.BLAS_INT_MAX // max(1, B)))


def _tuning(threads=None):
    """The tuning a plan depends on, with the thread count (threads: as the
    caller read it; None: read here)."""
    return (MIN_PARALLEL_WORK, UNIT_SPLIT_MIN_MACS, UNIT_SPLIT_MIN_WORK, UNIT_SPLIT_MAX_ROWS,
            UNIT_SPLIT_MIN_BYTES, WINDOW_BYTES, MIN_WINDOW_STEPS, FOLD_MAX_BYTES,
            FLOAT64_WINDOWS_MIN_BYTES, v.BLAS_INT_MAX,
            _parallel.get_num_threads() if threads is None else threads)


def _quant_tuning(threads=None):
    return (QUANT_DIRECT_WORK, QUANT_WINDOW_BYTES, QUANT_UNIT_GROUP, QUANT_UNIT_SPLIT_MAX_ROWS,
            QUANT_UNIT_SPLIT_MIN_BYTES, QUANT_UNIT_SPLIT_DTYPES) + _tuning(threads)


_plans: dict = {}
_building = threading.local()   # .threads: the count of the plan this thread builds


def _plan_threads():
    """The thread count the decisions below are for: while a plan is built,
    the one its cache key holds (read once by the caller: a
    set_num_threads from another thread in between must not give the key of
    one count a plan of another), else the current one."""
    threads = getattr(_building, "threads", None)
    return _parallel.get_num_threads() if threads is None else threads


def _cached(key, threads, build):
    """The plan under ``key`` (which holds ``threads``, the count it is
    for), built by ``build()`` for that count if not kept."""
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= PLAN_CACHE_SIZE:
            _plans.clear()
        outer, _building.threads = getattr(_building, "threads", None), threads
        try:
            plan = build()
        finally:   # (a build re-entered on this thread: the outer one's count back)
            _building.threads = outer
        _plans[key] = plan
    return plan


def forward_plan(layer, T, B, *, batch_first, train, has_lengths):
    """The plan of a forward call of ``layer`` (a RecurrentEngine) over T
    steps of B rows; the hidden-unit split is subject to the backoff at each
    call (``units`` says only that the shape allows it)."""
    cfg = layer._config
    threads = _parallel.get_num_threads()   # (once: the key's and the plan's)
    # (_general_only: zoneout runs on the general path with the same kernel
    # code as the plain layer)
    key = ("forward", layer._kernel_code, bool(layer._ln_index), layer._out_size,
           layer._general_only, layer._dropouts, layer._layers, layer._dirs,
           cfg["input_size"], cfg["hidden_size"], np.dtype(cfg["dtype"]).str, T, B,
           bool(batch_first), bool(train), bool(has_lengths)) + _tuning(threads)
    return _cached(key, threads,
                   lambda: _forward_plan(layer, T, B, batch_first, train, has_lengths))


def _forward_plan(layer, T, B, batch_first, train, has_lengths):
    dtype, H, D = layer._config["dtype"], layer._config["hidden_size"], \
        layer._config["input_size"]
    dirs, gates = layer._dirs, layer._gates
    N = dirs * gates * H
    # a batch-first call whose per-step BLAS product would need a leading
    # dimension T * N beyond BLAS' int runs time-major (copies of x and the
    # output): not a plain float32 inference, whose products are the
    # micro-kernel's, with Py_ssize_t strides (the detour doubled its memory
    # and time: LSTM 1->16 B=2 T=2**25, 8.3 GiB and 27 s with it, 4.3 GiB and
    # 17 s without; _general_only covers layer norm and projections)
    blas_products = dtype != np.float32 or train or layer._general_only
    time_major = bool(batch_first and B > 1 and T * N > v.BLAS_INT_MAX and blas_products)
    window = window_steps(B, N, dtype)
    if train or T <= window or (dirs != 1 and not _windows_both_directions(layer, T * B * N)):
        window = None   # (unidirectional windows each have a plan of their own)
    parts = split(dirs, B, T * B * row_step_work(layer))
    units = None
    layer_norm = bool(layer._ln_index)
    if _may_split_units(layer, B, has_lengths, train):
        group = _forward.group_units(gates, H) if dtype == np.float32 else 1
        units = unit_bounds(T, H, gates, group)
    hold = bool(layer._proj_index)   # a projection's per-step products are BLAS calls
    in_cols = D if layer._layers == 1 else max(D, dirs * H)
    products = product_parts(layer, parts, T * B * in_cols * N)
    if dtype != np.float32:   # float32 calls no BLAS
        # layer norm's per-step products are whole BLAS calls, not cut into
        # single-thread blocks as the plain kernels' are: always held
        hold = hold or layer_norm or units is not None or products > 1 or _parallel.hold_blas(
            parts, T * B, N, in_cols, B, gates * H, H,
            blas_at_batch_1=train and layer._dropouts is not None and layer._dropouts[1] > 0)
    fold = folds(layer)
    return Plan(parts, units, hold, window, time_major, fold, products,
                _stacks(layer, parts, train))


def _stacks(layer, parts, train):
    """Whether a call's parts each take their batch rows through every
    layer (``Plan.stack``, ``_forward.SequenceRunner.run_stack``), so that
    the parts meet once per call instead of twice per layer (the input
    projection, then the time loops) and no part reads rows another core
    wrote: float32 inference of a plain layer or stack whose parts are
    ranges of the batch (each with every direction; a plain LSTM's layers
    that fold their projection, the plan's ``fold``, fold it there too)."""
    return (not train and len(parts) > 1
            and layer._config["dtype"] == np.float32 and not layer._general_only
            and all(d_lo == 0 and d_hi == layer._dirs for d_lo, d_hi, _, _ in parts))


def _windows_both_directions(layer, elements):
    """Whether a bidirectional inference whose whole input projection
    holds ``elements`` values runs in time windows, layer by layer
    (``_forward.recur_windows``): plain kinds (no gate options, zoneout,
    layer norm or projection), unless every layer folds its projection into
    the steps (a folded layer writes no projections out: it runs whole among
    the windowed ones); float64 only where that projection takes
    FLOAT64_WINDOWS_MIN_BYTES or more."""
    if layer._config["dtype"] != np.float32 and elements * 8 < FLOAT64_WINDOWS_MIN_BYTES:
        return False
    return not layer._general_only and not all(folds(layer))


def _may_split_units(layer, B, has_lengths, train):
    """Whether a call's kind allows the unit split (then unit_bounds says
    whether it pays): one direction, no lengths, one row or a few over
    large float32 weights (_float_few_rows_split); not the reset-before GRU
    (its n product needs all of r * h mid-step), nor gate options, zoneout
    or layer norm (the general path), nor in training Keras' dropouts (the
    split's kernels know no masks). Plans are cached by all of these
    (forward_plan's and backward_plan's keys)."""
    return (layer._dirs == 1 and (B == 1 or _float_few_rows_split(layer, B))
            and not has_lengths
            and layer._kernel_code != _forward.CELL_GRU_RESET_BEFORE
            and not layer._general_only
            and not (train and layer._dropouts is not None))


def _float_few_rows_split(layer, B):
    """Whether a float32 call of B (> 1) rows splits its hidden units, not
    its rows: fewer than UNIT_SPLIT_MAX_ROWS over a W_hh of
    UNIT_SPLIT_MIN_BYTES or more (float64's products are BLAS calls)."""
    cfg = layer._config
    return (cfg["dtype"] == np.float32 and 1 < B < UNIT_SPLIT_MAX_ROWS
            and layer._gates * cfg["hidden_size"] ** 2 * 4 >= UNIT_SPLIT_MIN_BYTES)


def folds(layer):
    """Per layer, whether it folds the input projection into the step's
    product (FOLD_MAX_BYTES; in training not with Keras' input or recurrent
    dropout, which the engine checks)."""
    cfg = layer._config
    H, G, dirs = cfg["hidden_size"], layer._gates, layer._dirs
    if (cfg["dtype"] != np.float32 or layer._general_only
            or layer._kernel_code != _forward.CELL_LSTM):
        return (False,) * layer._layers
    sizes = [cfg["input_size"]] + [dirs * H] * (layer._layers - 1)
    return tuple(D + H <= G * H and (D + H) * G * H * 4 <= FOLD_MAX_BYTES for D in sizes)


def backward_plan(layer, T, B, has_lengths=False):
    """The plan of BPTT over a tape of T steps of B rows; ``units`` as
    forward_plan's, for ``_backward.backward_units``."""
    cfg = layer._config
    threads = _parallel.get_num_threads()
    key = ("backward", layer._kernel_code, bool(layer._ln_index), layer._out_size,
           layer._general_only, layer._dropouts, layer._layers, layer._dirs,
           cfg["input_size"], cfg["hidden_size"], np.dtype(cfg["dtype"]).str, T, B,
           bool(has_lengths)) + _tuning(threads)
    return _cached(key, threads, lambda: _backward_plan(layer, T, B, has_lengths))


def _backward_plan(layer, T, B, has_lengths):
    dtype, H, D = layer._config["dtype"], layer._config["hidden_size"], \
        layer._config["input_size"]
    N = layer._dirs * layer._gates * H
    parts = split(layer._dirs, B, 2 * T * B * row_step_work(layer))
    in_cols = max(D, layer._dirs * H)
    # the weight gradients' sums (over x and h) and dx's product
    products = product_parts(layer, parts, T * B * N * (2 * in_cols + H))
    hold = bool(layer._proj_index) or dtype != np.float32 and (
        bool(layer._ln_index) or products > 1 or _parallel.hold_blas(
        parts, T * B, N, in_cols, B, layer._gates * H, H, blas_at_batch_1=True))
    units = None
    if dtype == np.float32 and _may_split_units(layer, B, has_lengths, train=True):
        # on the column groups of W_hh packed for dG . W_hh (pack_backward)
        units = unit_bounds(T, H, layer._gates, _forward.group_units(1, H))
    return Plan(parts, units, hold, None, False, (), products)


class QuantPlan(NamedTuple):
    parts: list          # as Plan's
    direct: bool         # one part, small: run on the calling thread, no dispatch
    window_bytes: int    # the time windows' bound (unidirectional stacks)
    units: list | None   # batch 1 (or a few rows): the threads' hidden-unit
                         # bounds [0, b_1, ..., H] (_quant.forward_units), or None


def quantized_plan(layer, T, B, has_lengths=False):
    """The plan of a reduced-precision call of ``layer`` (a quantized layer
    or cell) over T steps of B rows, cached as forward_plan's."""
    cfg = layer._config
    threads = _parallel.get_num_threads()
    key = ("quantized", cfg["weight_dtype"], layer._kernel_code, cfg.get("num_layers", 1),
           layer._dirs, cfg["hidden_size"], T, B, bool(has_lengths)) + _quant_tuning(threads)
    return _cached(key, threads, lambda: _quantized_plan(layer, T, B, has_lengths))


def _quantized_plan(layer, T, B, has_lengths):
    """quantized_plan's plan. Its work counts every layer (each part takes
    its rows through all of them) and weighs the products at a
    quarter of float32's per multiply-add (int8 or bfloat16), but not the
    gate pass, which is float32's own (measured 2026-12-03, RNN 1->50, two
    layers, B=32, T=50, at 2 threads: 0.28 ms on one thread, 0.19 split,
    where the product-only estimate had kept it on one). A unidirectional
    batch-1 call without lengths splits its hidden units between the
    threads (unit_bounds: float32's thresholds; where each part's columns
    lie on the kernels' column groups, _quant.units_fit, the parts multiply
    the packed weights' columns, else each its own rows packed apart), and
    so does an int8 call of a few rows over large weights
    (QUANT_UNIT_SPLIT_MAX_ROWS says when) instead of splitting its rows."""
    H, dirs = layer._config["hidden_size"], layer._dirs
    work = T * B * quantized_row_step_work(layer)
    parts = split(dirs, B, work)
    units = None
    if (dirs == 1 and not has_lengths
            and layer._kernel_code != _forward.CELL_GRU_RESET_BEFORE):
        if B == 1:   # (off the column groups: each part's own weights)
            units = unit_bounds(T, H, layer._gates, QUANT_UNIT_GROUP)
        elif 1 < B and len(parts) >= 2 and _few_rows_split_units(layer, B):
            units = unit_bounds(T, H, layer._gates, QUANT_UNIT_GROUP)
            # only where forward_units' column groups fit the split
            if units is not None and not _quant_kernel().units_fit(layer._gates, H, units, B):
                units = None
    return QuantPlan(parts, len(parts) == 1 and work < QUANT_DIRECT_WORK, QUANT_WINDOW_BYTES,
                     units)


def _quant_kernel():
    """The quantized kernels' module of this CPU (fastrnn.quantized picks
    it, and imports this module: imported here when first asked)."""
    from fastrnn import quantized
    return quantized._quant


def _few_rows_split_units(layer, B):
    """Whether a call of B (> 1) batch rows splits its hidden units: fewer
    than QUANT_UNIT_SPLIT_MAX_ROWS, W_hh in QUANT_UNIT_SPLIT_DTYPES of
    QUANT_UNIT_SPLIT_MIN_BYTES or more on the AMX tiles, twice that without
    them (and the split one forward_units takes: _quant.units_fit)."""
    if (B >= QUANT_UNIT_SPLIT_MAX_ROWS
            or layer._config["weight_dtype"] not in QUANT_UNIT_SPLIT_DTYPES):
        return False
    H = layer._config["hidden_size"]
    least = QUANT_UNIT_SPLIT_MIN_BYTES * (1 if _quant_kernel().AMX else 2)
    return layer._gates * H * H >= least


def quantized_row_step_work(layer):
    """The work estimate of quantized_plan for one batch row and step."""
    H = layer._config["hidden_size"]
    return layer._config.get("num_layers", 1) * layer._dirs * layer._gates * H * (H // 4 + 20)


def quantized_runner_limits(layer, threads):
    """(work of a row and step, work bound, steps from which a batch-1 call
    may split its units (2**62: never)) for the lean path's _quant.QRunner,
    which takes a call below both bounds: quantized_plan's ``direct`` and ``units`` conditions, or
    stricter (at 2 threads it leaves every call from MIN_PARALLEL_WORK on
    to the plan, even a batch-1 one the plan runs in one part, and so every
    call the plan would give a unit split of a few rows), so that the runner
    takes only calls the plan would run in one part without the dispatch.
    threads: the thread count the caller keys the runner by (read once, so
    that a concurrent set_num_threads cannot give the key one count and the
    limits another)."""
    H = layer._config["hidden_size"]
    max_work = QUANT_DIRECT_WORK
    if threads > 1:
        max_work = min(max_work, MIN_PARALLEL_WORK)
    split_steps = None
    if layer._dirs == 1 and layer._kernel_code != _forward.CELL_GRU_RESET_BEFORE:
        split_steps = unit_split_steps(H, layer._gates, threads)
    return (quantized_row_step_work(layer), max_work,
            2**62 if split_steps is None else split_steps)


def row_step_work(layer):
    """forward_plan's work estimate of one batch row and step of a float
    layer (its every direction; backward_plan counts it twice)."""
    H = layer._config["hidden_size"]
    return layer._dirs * layer._gates * H * (H + 20)


def runner_limits(layer, threads):
    """(work of a row and step, work below which one thread runs, steps from
    which a batch-1 call splits its units (2**62: never)) for the lean path's
    SequenceRunner at ``threads`` threads (the count the caller keys the
    runner by). A call of a few rows the plan would split
    (UNIT_SPLIT_MAX_ROWS) stays in the runner, in one thread, below the
    work bound: a few steps (LSTM 370 at 2 rows: 2 or 3); whether splitting
    those would pay was not measured."""
    split_steps = unit_split_steps(layer._config["hidden_size"], layer._gates, threads)
    if layer._dirs != 1 or layer._kernel_code == _forward.CELL_GRU_RESET_BEFORE:
        split_steps = None
    return (row_step_work(layer), MIN_PARALLEL_WORK,
            2**62 if split_steps is None else split_steps)
