"""How a layer call uses both cores (the kernels run the parts: the calling
thread one, the kernels' C worker thread, _worker.h, the other).

The time loop of a layer cannot be split across steps, but its directions,
and the rows of its batch, are independent recurrences: each part runs its
whole time loop with no per-step synchronisation. At batch 1 a big enough
step splits its hidden units instead, the two parts meeting at a barrier
every step. The input projections and the BPTT weight and input gradients
split by rows or columns. The kernels release the GIL and keep their
per-step BLAS calls single-threaded, so the parts do not contend.

fastrnn's threads do the parallel work, and scipy's BLAS (the one the
kernels call) runs at one thread under them: OpenBLAS's idle threads spin for
a while after a threaded call and would compete with fastrnn's for the cores
(measured on 2 cores: GRU b32-h128 inference 6.5 -> 4.2 ms with the split, no
gain without holding BLAS). Holding it also keeps results reproducible: with
some OpenBLAS kernels (e.g. its Haswell sgemm) a product threaded over two
threads rounds differently from the same product on one.
"""
from __future__ import annotations

import numbers
import os
import threading

from fastrnn._kernels import forward as _forward


# the most threads one call uses (the kernels' job size, _worker.pxd)
MAX_THREADS = 64


def _cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not on Linux
        return os.cpu_count() or 1


def _default_threads():
    value = os.environ.get("FASTRNN_NUM_THREADS")
    if value is not None:
        try:
            n = int(value)
        except ValueError:
            raise ImportError(f"fastrnn: FASTRNN_NUM_THREADS must be an int >= 1, "
                              f"got {value!r}") from None
        if n < 1:
            raise ImportError(f"fastrnn: FASTRNN_NUM_THREADS must be an int >= 1, got {n}")
        return min(n, MAX_THREADS)
    return min(_cores(), MAX_THREADS)


_threads = _default_threads()

# Below this many multiply-adds (plus gate work) a recurrence runs in one
# thread: handing half to the worker costs tens of microseconds.
MIN_PARALLEL_WORK = 4_000_000


def set_num_threads(n: int) -> None:
    """Threads fastrnn may use for one call (the calling thread and n - 1
    workers), at most 64: the directions, ranges of the batch, of the
    hidden units, of the rows of the large products run at once.

    Also set by the environment variable FASTRNN_NUM_THREADS; the default is
    the number of cores this process may run on (os.sched_getaffinity).
    """
    global _threads
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads: expected an int >= 1, got {type(n).__name__} "
                        f"{n!r}")
    if n < 1:
        raise ValueError(f"set_num_threads: expected an int >= 1, got {n!r}")
    _threads = min(int(n), MAX_THREADS)


def get_num_threads() -> int:
    """The threads fastrnn may use for one call (see ``set_num_threads``)."""
    return _threads


class _BlasAtOneThread:
    """Context: scipy's BLAS at one thread while a fastrnn call that needs it
    runs. ``held`` tells whether there was a BLAS to hold (threadpoolctl
    found it).

    scipy's wheels ship an OpenBLAS of their own (numpy's is another
    library), which only scipy.linalg and fastrnn call. That one is taken to
    one thread the first time a call needs it and kept there: setting and
    restoring it around every call from many threads is not reliable (with
    OpenBLAS 0.3.30 a thread that restored the count keeps using its own
    value, so concurrent calls ran threaded, and rounded differently, while
    another call was holding). A BLAS shared with numpy (system builds) is
    held only while fastrnn calls run, its setting restored when the last
    one ends.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._libs = None
        self._private = False
        self._saved = []
        self.held = False

    def _find_libs(self):
        """scipy's BLAS libraries and whether they are scipy's own."""
        try:
            import scipy
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return [], False
        blas = [lib for lib in ThreadpoolController().lib_controllers
                if lib.user_api == "blas"]
        # scipy's wheels ship their own OpenBLAS beside the package, in
        # scipy.libs/; elsewhere (a system BLAS shared with numpy) hold them all
        scipy_dir = os.path.dirname(os.path.abspath(scipy.__file__))
        own = [lib for lib in blas
               if lib.filepath.startswith((scipy_dir + ".libs" + os.sep, scipy_dir + os.sep))]
        return (own, True) if own else (blas, False)

    def __enter__(self):
        with self._lock:
            if self._libs is None:
                self._libs, self._private = self._find_libs()
                self.held = bool(self._libs)
                if self._private:
                    for lib in self._libs:
                        lib.set_num_threads(1)
            if self._private:
                return self
            if self._depth == 0:
                self._saved = [lib.num_threads for lib in self._libs]
                try:
                    for lib in self._libs:
                        lib.set_num_threads(1)
                except BaseException:
                    for lib, n in zip(self._libs, self._saved):
                        lib.set_num_threads(n)
                    raise
            self._depth += 1
        return self

    def __exit__(self, *exc):
        if self._private:
            return
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in zip(self._libs, self._saved):
                    lib.set_num_threads(n)


blas_at_one_thread = _BlasAtOneThread()


def hold_blas(parts, rows, n_cols, in_cols, batch, gates_h, hidden):
    """Whether a layer call should hold BLAS at one thread: when it runs in
    parts, or when one of its BLAS calls is large enough for OpenBLAS to
    thread (holding costs ~10 us, a small call need not pay it). The bounds
    are the kernels' own (_forward.blas_hold_needed)."""
    return len(parts) > 1 or _forward.blas_hold_needed(rows, n_cols, in_cols, batch, gates_h,
                                                       hidden)


def _after_fork_in_child():
    """The lock may have been copied held: start afresh in a forked child
    (multiprocessing's fork, gunicorn --preload). The C worker resets itself."""
    global blas_at_one_thread
    blas_at_one_thread = _BlasAtOneThread()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def split(dirs, batch, work):
    """Parts (d_lo, d_hi, b_lo, b_hi) to run at once, one per thread: the
    directions, each cut into ranges of the batch; everything in one part
    below MIN_PARALLEL_WORK."""
    n = _threads
    if n < 2 or work < MIN_PARALLEL_WORK:
        return [(0, dirs, 0, batch)]
    per_direction = max(1, min(n // dirs, batch))
    if dirs == 1 or per_direction > 1 or n < dirs:
        dir_ranges = [(d, d + 1) for d in range(dirs)] if n >= dirs else [(0, dirs)]
    else:
        dir_ranges = [(d, d + 1) for d in range(dirs)]
    parts = [(d_lo, d_hi, lo, hi) for d_lo, d_hi in dir_ranges
             for lo, hi in chunks(batch, per_direction)]
    return parts if len(parts) > 1 else [(0, dirs, 0, batch)]


# A batch-1 unidirectional layer splits its hidden units between this thread
# and the kernels' worker (_worker.h), which meet at a barrier after every
# step, when a step has at least UNIT_SPLIT_MIN_MACS recurrent multiply-adds
# and the call UNIT_SPLIT_MIN_WORK. The barrier and the exchange of h cost
# ~1 us per step on this 2-core VM (LSTM 16->32 T=100: 52 us in one thread,
# 148 us split; GRU 64->128: 424 vs 483 us; GRU 64->256: 1230 vs 950 us).
UNIT_SPLIT_MIN_MACS = 131072
UNIT_SPLIT_MIN_WORK = 1_000_000
# How long a unit split waits for the worker to take its part before the
# layer runs in one thread instead (a worker asleep may take that long to
# wake on a virtual machine; a split step is >= ~10 us).
UNIT_SPLIT_WAIT_NS = 200_000


def unit_split_steps(H, gates):
    """The fewest steps from which a batch-1 unidirectional layer splits its
    hidden units, or None if it never does (one thread, or small steps)."""
    macs = gates * H * H
    if _threads < 2 or macs < UNIT_SPLIT_MIN_MACS:
        return None
    return max(2, -(-UNIT_SPLIT_MIN_WORK // macs))


# After a split whose parts kept waiting for each other (they had no core
# each: the machine was busy), this many batch-1 calls run in one thread.
UNIT_SPLIT_BACKOFF = 16
_backoff = 0


def unit_split_contended():
    global _backoff
    _backoff = UNIT_SPLIT_BACKOFF


def unit_halves(T, H, gates):
    """Bounds [0, mid, H] of the two threads' hidden units for a batch-1
    unidirectional layer, or None when it should run in one thread. mid is a
    multiple of 16 (whole float32 cache lines for each part's units)."""
    global _backoff
    steps = unit_split_steps(H, gates)
    if steps is None or T < steps:
        return None
    if _backoff > 0:   # unsynchronised: a lost update costs one call's choice
        _backoff -= 1
        return None
    mid = min(H - 1, max(16, (H // 2 + 8) // 16 * 16))
    return [0, mid, H]


def chunks(n, count):
    """[0, n) cut into ``count`` contiguous ranges as even as can be."""
    count = max(1, min(count, n)) if n > 0 else 1
    return [(k * n // count, (k + 1) * n // count) for k in range(count)]


def halves(n, parts):
    """Split [0, n) (rows or columns) into as many contiguous ranges as there
    are parts."""
    return chunks(n, len(parts))
