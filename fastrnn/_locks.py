"""Locks that survive fork() and interrupts.

A child process made by fork() while another thread of the parent held a
lock would inherit it held, with no thread left to release it: the child's
first backprop, optimizer step or load would wait forever (multiprocessing's
"fork" start method, gunicorn --preload, Dask's forking workers). Every lock
fastrnn owns is a ``ForkSafeLock``: the child replaces each with a fresh one.
It is compiled (``_worker.pyx``), so that ``with`` takes it in one step that
no signal handler can split. The C worker thread and the BLAS hold reset
themselves likewise (``_worker.h``, ``_parallel``).
"""
from fastrnn._worker import ForkSafeLock

__all__ = ["ForkSafeLock", "CallLock"]


class CallLock:
    """Base of an object whose calls run one at a time under ``self._lock``
    (a ForkSafeLock): the lock is left out of its pickles and copies, and
    each copy gets one of its own."""

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = ForkSafeLock()
