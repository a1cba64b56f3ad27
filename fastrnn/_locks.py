"""Locks that survive fork().

A child process made by fork() while another thread of the parent held a
lock would inherit it held, with no thread left to release it: the child's
first backprop, optimizer step or load would wait forever (multiprocessing's
"fork" start method, gunicorn --preload, Dask's forking workers). Every lock
fastrnn owns is a ``ForkSafeLock``: the child replaces each with a fresh one.
The C worker thread and the BLAS hold reset themselves likewise
(``_worker.h``, ``_parallel``).
"""
import os
import threading
import weakref

_live = weakref.WeakSet()


class ForkSafeLock:
    """A ``threading.Lock`` (``threading.RLock`` if ``reentrant``) for
    ``with`` blocks, made anew in a forked child."""
    __slots__ = ("_lock", "_make", "__weakref__")

    def __init__(self, reentrant=False):
        self._make = threading.RLock if reentrant else threading.Lock
        self._lock = self._make()
        _live.add(self)

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


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


def _reset_in_child():
    # the child has only the thread that called fork(): no lock can be in
    # use by a thread of its own
    for lock in list(_live):
        lock._lock = lock._make()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
