"""The thread count of fastrnn's calls and scipy's BLAS under them.

How a call is cut into parts, one per thread, is the plan's (_plan.py); the
kernels run the parts on the calling thread and the pool of _worker.h, with
the GIL released and their BLAS calls (float64) single-threaded, so the
parts do not contend.

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

import numpy as np

from fastrnn import _validation as v
from fastrnn._kernels import backward as _backward
from fastrnn._kernels import forward as _forward


# the most threads one call uses (the kernels' job size, _worker.pxd)
MAX_THREADS = 64


# Where Linux shows this process's cgroup, whose CPU quota (a container's
# ``--cpus``) bounds the default thread count as its CPU affinity does:
# threads beyond the quota get throttled for the rest of each period, and the
# batch-1 unit split, whose parts meet every step, would wait on them.
CGROUP_ROOT = "/sys/fs/cgroup"


def _read_ints(path, allow_max=False):
    """The whitespace-separated integers of a small file ("max": None), or
    None if it cannot be read."""
    try:
        with open(path) as f:
            words = f.read().split()
        return [None if allow_max and w == "max" else int(w) for w in words]
    except (OSError, ValueError):
        return None


def _quota_cpus():
    """The CPUs a cgroup CPU quota allows (rounded up), or None without a
    quota: cgroup v2's cpu.max ("quota period" or "max period"), else v1's
    cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us."""
    v2 = _read_ints(os.path.join(CGROUP_ROOT, "cpu.max"), allow_max=True)
    if v2 is not None:
        quota, period = (v2 + [None, None])[:2]
    else:
        quota = (_read_ints(os.path.join(CGROUP_ROOT, "cpu", "cpu.cfs_quota_us")) or [None])[0]
        period = (_read_ints(os.path.join(CGROUP_ROOT, "cpu", "cpu.cfs_period_us")) or [None])[0]
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))


def _cores():
    """The cores this process may run on: its CPU affinity, within its
    cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not on Linux
        cores = os.cpu_count() or 1
    quota = _quota_cpus()
    return cores if quota is None else min(cores, quota)


def _default_threads():
    value = os.environ.get("FASTRNN_NUM_THREADS", "").strip()
    if value:   # set and not empty (an empty variable counts as unset)
        if not (value.isascii() and value.isdigit()):   # not int()'s "2_0" or "+3"
            raise ImportError(f"fastrnn: FASTRNN_NUM_THREADS must be an int >= 1, "
                              f"got {value!r}")
        # (leading zeros dropped, and any count past MAX_THREADS is MAX_THREADS,
        # so that no length of digits meets int()'s limit of 4300)
        digits = value.lstrip("0") or "0"
        n = int(digits) if len(digits) <= len(str(MAX_THREADS)) else MAX_THREADS
        if n < 1:
            raise ImportError(f"fastrnn: FASTRNN_NUM_THREADS must be an int >= 1, got {n}")
        return min(n, MAX_THREADS)
    return min(_cores(), MAX_THREADS)


_threads = _default_threads()

def set_num_threads(n: int) -> None:
    """Threads fastrnn may use for one call (the calling thread and n - 1
    workers), at most 64: the directions, ranges of the batch, of the
    hidden units, of the rows of the large products run at once.

    Also set by the environment variable FASTRNN_NUM_THREADS; the default is
    the number of cores this process may run on (os.sched_getaffinity),
    within its cgroup's CPU quota (a container's ``--cpus``, rounded up).
    """
    global _threads
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads: expected an int >= 1, got {type(n).__name__} "
                        f"{n!r}")
    if n < 1:
        raise ValueError(f"set_num_threads: expected an int >= 1, got {v.int_str(n)}")
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
    another call was holding). Each call checks it is still at one (0.4 us)
    and sets it back if not: a user's ``threadpool_limits`` block that
    ended, or a later ``threadpool_limits(2)``, had left it threaded for
    good (float64 training 1.9 s -> 4.2 s). A BLAS shared with numpy
    (system builds) is held only while fastrnn calls run, its setting
    restored when the last one ends.

    The lock is reentrant: a call from a signal handler (or a finalizer)
    landing while this thread runs the Python code under it would otherwise
    wait for good. What runs under it is idempotent (find the libraries, set
    them to one thread) or counted, so the inner call's holding inside the
    outer's leaves them as the outer's alone would.
    """

    def __init__(self):
        self._lock = threading.RLock()
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
                    if lib.num_threads != 1:
                        lib.set_num_threads(1)
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


def matmul(a, b):
    """a @ b (C order) through scipy's BLAS at one thread, for the products
    computed in Python (Linear's gradients and float64 outputs, per gate
    under Keras' dropouts, dW_hr). numpy's own BLAS would thread them: on 2 busy cores its two threads took
    11.5 ms for a (3200, 128)^T (3200, 64) product that one thread does in
    1.4, and a threaded sgemm may round differently from one thread's."""
    from scipy.linalg.blas import get_blas_funcs
    gemm = get_blas_funcs("gemm", (a, b))
    with blas_at_one_thread:   # the row-major product as column-major C^T = B^T A^T
        return gemm(1.0, b.T, a.T).T


def _over_row_groups(a, part):
    """The sum over the rows of a (R, ...) of ``part(r0, r1)``, a group of
    rows' float32 sum, as the kernels sum the gradients over rows
    (_backward's SUM_GROUP_ROWS): each group's own, the groups' totals added
    in float64 and rounded once. (float64, and one group: part(0, R).)"""
    rows, group = a.shape[0], _backward.SUM_GROUP_ROWS
    if rows <= group or a.dtype == np.float64:
        return part(0, rows)
    total = sum(part(r0, min(rows, r0 + group)).astype(np.float64)
                for r0 in range(0, rows, group))
    return total.astype(a.dtype)


def row_products(a, b):
    """a^T b (a (R, M), b (R, N)): the sums over rows of a weight gradient
    computed in Python (Linear's weight, a projection's W_hr), a BLAS
    product a group of rows (one product over 4.2 M rows was 3e-6 off, the
    grouped kernel sums beside it 4e-7)."""
    return _over_row_groups(a, lambda r0, r1: matmul(a[r0:r1].T, b[r0:r1]))


def column_sums(a, b=None):
    """The sums over the rows (axis 0) of a (R, N), or of a * b, a group of
    rows at a time: numpy's sum along axis 0 is one chain a column (33.5 M
    rows of 1 summed to 2^24, 4.2 M random ones lost 7e-3 of a bias
    gradient)."""
    if b is None:
        return _over_row_groups(a, lambda r0, r1: a[r0:r1].sum(axis=0))
    return _over_row_groups(a, lambda r0, r1: np.einsum("rj,rj->j", a[r0:r1], b[r0:r1]))


def hold_blas(parts, rows, n_cols, in_cols, batch, gates_h, hidden, blas_at_batch_1):
    """Whether a float64 layer call should hold BLAS at one thread: when it
    runs in parts, or when one of its BLAS calls is large enough for
    OpenBLAS to thread (holding costs ~10 us, a small call need not pay it).
    The bounds are the kernels' own (_forward.blas_hold_needed, which says
    what ``blas_at_batch_1`` is)."""
    return len(parts) > 1 or _forward.blas_hold_needed(rows, n_cols, in_cols, batch, gates_h,
                                                       hidden, blas_at_batch_1)


def _after_fork_in_child():
    """The lock may have been copied held: start afresh in a forked child
    (multiprocessing's fork, gunicorn --preload). The C worker resets itself."""
    global blas_at_one_thread
    blas_at_one_thread = _BlasAtOneThread()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
