# The kernels' worker threads: see _worker.h. Its functions live in this
# module only, so that the forward and backward kernels (and all their
# builds) share one pool; they reach them through _worker.pxd.

import os
import threading
import weakref

from libc.string cimport memset

cdef extern from "Python.h":
    # declared here without an exception clause: the pending exception it
    # sets must stay set for run_parts to raise, not be handled on the spot
    int PyErr_CheckSignals() noexcept

cdef extern from "_fpenv.h":
    unsigned int fastrnn_fpenv() noexcept nogil
    void fastrnn_restore_fpenv(unsigned int env) noexcept nogil

cdef extern from "_worker.h":
    long long fastrnn_clock_ns() noexcept nogil
    unsigned long long fastrnn_thread_id() noexcept nogil
    int fastrnn_load_int(const int* p) noexcept nogil
    void fastrnn_store_int(int* p, int v) noexcept nogil
    ctypedef void (*fastrnn_job_fn)(void* arg, int part) noexcept nogil
    ctypedef void (*fastrnn_poll_fn)(void* ctx) noexcept nogil
    void fastrnn_run_parts(fastrnn_job_fn fn, void* arg, int nparts, int workers,
                           fastrnn_poll_fn poll, void* ctx) noexcept nogil
    int fastrnn_run_team(fastrnn_job_fn fn, void* arg, int nparts,
                         long long wait_ns, long long* started) noexcept nogil
    int fastrnn_worker_init() noexcept nogil
    int fastrnn_current_cpu() noexcept nogil
    int fastrnn_move_off_cpu(int cpu, int* moved_to) noexcept nogil
    ctypedef struct fastrnn_worker_t:
        long long by_worker, by_caller, withdrawn, moved, steered
        int registered
        int asleep[64]
    fastrnn_worker_t fastrnn_worker


def stats():
    """(parts the workers ran, parts the callers ran, team jobs withdrawn
    because the workers did not all come in time, workers that woke on
    their caller's CPU and moved off it, sleeping workers whose wake-up was
    steered off the caller's CPU): how often the other cores really
    helped, since the process started (a forked child starts from its
    parent's counts). Counted without locks: about."""
    return (fastrnn_worker.by_worker, fastrnn_worker.by_caller, fastrnn_worker.withdrawn,
            fastrnn_worker.moved, fastrnn_worker.steered)


def asleep_flags():
    """For the tests: each registered worker's 'asleep' flag (1 while it
    waits on the pool's condition, when a caller steers its wake-up)."""
    return [fastrnn_worker.asleep[i] for i in range(fastrnn_worker.registered)]


def move_off_current_cpu():
    """For the tests: (the CPU this thread ran on, whether it moved, the
    CPU it ran on while its affinity was narrowed), as a worker woken on
    its caller's CPU moves (-1: not known on this platform)."""
    cdef int before, moved, moved_to
    with nogil:
        before = fastrnn_current_cpu()
        moved = fastrnn_move_off_cpu(before, &moved_to)
    return before, bool(moved), moved_to


cdef int run_team(job_fn fn, void* arg, int nparts, long long wait_ns,
                  const long long* waits) noexcept nogil:
    """fn(arg, p) for p < nparts all at once (parts that meet at barriers,
    each adding the time it waited there to its waits[p]: team_barrier),
    this thread one of them. Returns 0, having run nothing, when the workers
    are owned by another call or do not all take their parts within
    wait_ns; else 1 when done, or 2 when done but contended: a part waited
    more than a third of the time from the parts' start (it did not have a
    core of its own: another program or the scheduler took it). A part
    sharing its core waits for the other's turns, about half the time
    (measured 0.50-0.61, two or three parts on fewer CPUs); with a core
    each, the jitter of short steps costs the part that waits most 0.01-0.21
    (float and quantized, training and inference, batch 1). The part that
    waits most, not the mean: a part whose core another program takes half
    of leaves the other part waiting half the time, itself hardly at all.
    (Counting yields, a quarter of the steps allowed, called nearly every
    training split at batch 1 contended on a CPU whose pause takes 12 ns,
    a yield after 0.8 us of waiting where steps take 5 us; the backoff then
    ran 16 of 17 steps in one thread: GRU 64->256, T=1000, 2 threads, 19.2
    ms a step against 15.7-16.5 split.)"""
    cdef long long started, elapsed, most = 0
    cdef int p
    if not fastrnn_run_team(<fastrnn_job_fn>fn, arg, nparts, wait_ns, &started):
        return 0
    elapsed = fastrnn_clock_ns() - started
    for p in range(nparts):
        most = max(most, waits[p])
    return 2 if 3 * most > elapsed else 1


cdef extern from "_portable.h":
    void fastrnn_wait_spin(long long* spins) noexcept nogil
    long long fastrnn_load_acquire_ll(const long long* p) noexcept nogil
    void fastrnn_store_release_ll(long long* p, long long v) noexcept nogil

# pauses between yields at a barrier (_tuning.h)
from fastrnn._tuning cimport WAIT_SPINS


cdef long long wait_for_part(long long* slots, int other, long long steps) noexcept nogil:
    """Wait until part ``other`` of a team has published ``steps`` steps:
    spinning (a step takes microseconds), with a yield every WAIT_SPINS
    pauses in case that part waits for this core. Returns the nanoseconds
    waited from the first yield on (0 when it came within WAIT_SPINS
    pauses: the clock is read only then)."""
    cdef long long spins = 0, yielded_at = 0
    while fastrnn_load_acquire_ll(slots + other * SYNC_SLOT) < steps:
        if spins == WAIT_SPINS - 1:   # the first yield comes next: time from it
            yielded_at = fastrnn_clock_ns()
        fastrnn_wait_spin(&spins)
    return fastrnn_clock_ns() - yielded_at if yielded_at else 0


cdef long long _wait_for_others(long long* slots, int part, int nparts,
                                long long steps) noexcept nogil:
    """Wait until every part but ``part`` (of nparts) has published ``steps``
    steps (wait_for_part). Returns the nanoseconds waited."""
    cdef long long waited = 0
    cdef int other
    for other in range(nparts):
        if other != part:
            waited += wait_for_part(slots, other, steps)
    return waited


cdef long long* team_slots(long long* raw, int nparts) noexcept nogil:
    """The barrier slots of a team of nparts (and team_barrier's stop_at)
    in raw, which holds (nparts + 1) * SYNC_SLOT + 16 long longs: 128-byte
    aligned (no slot shares a cache line), zeroed."""
    cdef long long* slots = <long long*>((<size_t>raw + 127) & ~(<size_t>127))
    memset(slots, 0, (nparts + 1) * SYNC_SLOT * sizeof(long long))
    return slots


cdef bint unit_bounds_fit(bounds, Py_ssize_t H, Py_ssize_t width) except -1:
    """Whether ``bounds`` (0 = b_0 < b_1 < ... < b_n = H) split H units in
    2 to MAX_PARTS parts, the inner bounds multiples of ``width`` (a part
    computes whole packed groups)."""
    cdef Py_ssize_t n = len(bounds) - 1, p
    return (2 <= n <= MAX_PARTS and bounds[0] == 0 and bounds[n] == H
            and all(bounds[p] < bounds[p + 1] for p in range(n))
            and all(bounds[p] % width == 0 for p in range(1, n)))


cdef int check_unit_bounds(str owner, bounds, Py_ssize_t H, Py_ssize_t width) except -1:
    """Raise ValueError unless unit_bounds_fit(bounds, H, width)."""
    if not unit_bounds_fit(bounds, H, width):
        raise ValueError(f"{owner}: bounds {list(bounds)} must rise from 0 to H={H} in 2 to "
                         f"{MAX_PARTS} parts, on multiples of {width} units")
    return 0


fastrnn_worker_init()   # the fork handler, before any call can claim the worker


# how often the calling thread runs the signal handlers, and the steps between
# two readings of the clock: _tuning.h
from fastrnn._tuning cimport INTERRUPT_POLL_NS, INTERRUPT_STEPS_PER_CLOCK

cdef unsigned long long _main_thread = threading.main_thread().ident


# --- locks that survive fork() and interrupts (fastrnn._locks) ---
_live_locks = weakref.WeakSet()


cdef class ForkSafeLock:
    """A ``threading.Lock`` (``threading.RLock`` if ``reentrant``) for
    ``with`` blocks, made anew in a forked child (see fastrnn._locks).

    Compiled, so that ``with`` takes it in one step: a ``__enter__`` written
    in Python could be interrupted (a signal handler that raises, between
    its acquire and its return) with the lock taken and no ``__exit__`` to
    come, and every later taker would wait for good."""
    cdef readonly object _lock
    cdef object _make
    cdef object __weakref__

    def __init__(self, reentrant=False):
        self._make = threading.RLock if reentrant else threading.Lock
        self._lock = self._make()
        _live_locks.add(self)

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def _renew(self):
        self._lock = self._make()


def _after_fork_in_child():
    # the child's main thread is the one that forked
    global _main_thread
    _main_thread = threading.main_thread().ident
    # a lock may have been copied held by a thread the child does not have
    for lock in list(_live_locks):
        lock._renew()


if hasattr(os, "register_at_fork"):      # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


cdef void interrupt_start(Interrupt* it) noexcept nogil:
    """A call's interrupt, before its parts run: this thread polls if it is
    Python's main thread."""
    it.stop = 0
    it.caller = fastrnn_thread_id()
    it.polls = it.caller == _main_thread
    it.countdown = INTERRUPT_STEPS_PER_CLOCK
    it.next_ns = fastrnn_clock_ns() + INTERRUPT_POLL_NS
    it.fpenv = fastrnn_fpenv()   # (before the parts flush denormals)


cdef bint interrupted(Interrupt* it, bint read_clock=False) noexcept nogil:
    """Whether the call must stop: a signal handler raised (the exception is
    pending and run_parts raises it). Cheap: one load on most steps; the
    clock is read every few steps, or at once with read_clock (between
    blocks of a large product)."""
    cdef long long now
    cdef unsigned int kernel_env
    cdef int raised
    if it == NULL:
        return False
    if fastrnn_load_int(&it.stop):
        return True
    if not it.polls or fastrnn_thread_id() != it.caller:
        return False
    it.countdown -= 1
    if it.countdown > 0 and not read_clock:
        return False
    it.countdown = INTERRUPT_STEPS_PER_CLOCK
    now = fastrnn_clock_ns()
    if now < it.next_ns:
        return False
    with gil:
        # the handlers are the caller's code: they run in its FP
        # environment, not the kernel's (denormals flushed, nearest)
        kernel_env = fastrnn_fpenv()
        fastrnn_restore_fpenv(it.fpenv)
        raised = PyErr_CheckSignals()
        fastrnn_restore_fpenv(kernel_env)
        if raised != 0:
            fastrnn_store_int(&it.stop, 1)
            return True
    it.next_ns = fastrnn_clock_ns() + INTERRUPT_POLL_NS
    return False


cdef bint team_barrier(long long* slots, int part, int nparts, long long steps,
                       Interrupt* it, long long* waits) noexcept nogil:
    """The barrier of a team job (run_team) that a signal may stop: publish
    that ``part`` (of nparts) has done ``steps`` steps, wait until every
    other part has too; returns whether every part stops after it. slots: nparts + 1
    slots of SYNC_SLOT, the barrier's, then stop_at (0: none). Only the
    caller's part (0) polls ``it``, and before it publishes its count names
    this barrier in stop_at: no other part can pass the barrier without
    seeing that. Part 0 may pass this barrier and name the next before a
    slower part reads stop_at here; that part then reads the next one's
    name, runs one more step and stops there with part 0, which names no
    barrier after the one it stops at. So the parts never leave at
    different steps (one would wait at its barrier for ever). waits[0]
    adds the nanoseconds waited. (team_publish, then the wait.)"""
    team_publish(slots, part, nparts, steps, it)
    waits[0] += _wait_for_others(slots, part, nparts, steps)
    return team_stops(slots, nparts, steps)


cdef bint team_publish(long long* slots, int part, int nparts, long long steps,
                       Interrupt* it) noexcept nogil:
    """team_barrier's first half, for parts that each wait only for the
    part whose output they read next (wait_for_part): publish that ``part``
    has done ``steps`` steps. Part 0 first polls ``it`` and, if a handler
    raised, names this step in stop_at; returns whether part 0 stops here.
    Another part learns it from team_stops once it has waited for part 0's
    count of ``steps``, which it does before it reads part 0's output of
    this step (and part 0 can be at most one step ahead: its next step
    reads that part's output); so every part leaves after the same step."""
    cdef long long* stop_at = slots + nparts * SYNC_SLOT
    cdef bint stop = part == 0 and interrupted(it)
    if stop:
        fastrnn_store_release_ll(stop_at, steps)
    fastrnn_store_release_ll(slots + part * SYNC_SLOT, steps)
    return stop


cdef bint team_stops(long long* slots, int nparts, long long steps) noexcept nogil:
    """Whether part 0 named the barrier of ``steps`` steps its last
    (team_publish); read after waiting for part 0's count of ``steps``."""
    return fastrnn_load_acquire_ll(slots + nparts * SYNC_SLOT) == steps


cdef int raise_if_interrupted(Interrupt* it) except -1:
    """After a job's parts: raise the exception a signal handler raised
    meanwhile (pending since ``interrupted`` ran the handlers)."""
    if it.stop:
        return -1
    return 0


cdef Py_ssize_t interrupt_block_rows(Py_ssize_t macs_per_row, Py_ssize_t max_rows) noexcept nogil:
    """Rows of one block of a large product: about INTERRUPT_BLOCK_MACS
    multiply-adds, at most max_rows (the BLAS int range), at least 1. It
    depends on the whole product's shape only, never on how it is split
    between threads, so the sums come out the same either way."""
    cdef Py_ssize_t rows = INTERRUPT_BLOCK_MACS // max(<Py_ssize_t>1, macs_per_row)
    return max(<Py_ssize_t>1, min(rows, max_rows))


cdef void _poll_while_waiting(void* it) noexcept nogil:
    """run_parts' caller, its own parts done, waits for the workers': it
    still runs the signal handlers (a Ctrl-C is answered whichever thread
    has the longer part), and the workers' parts stop at their next step."""
    interrupted(<Interrupt*>it)


cdef int run_parts(job_fn fn, void* arg, Py_ssize_t* ranges, Py_ssize_t width,
                   parts, Interrupt* interrupt=NULL) except -1:
    """The dispatch of every kernel entry that runs in parts: copy ``parts``
    (up to MAX_PARTS tuples of ``width`` values, (lo, hi) pairs) into the
    job's ranges (MAX_PARTS x width), then run fn(arg, p) for each part
    without the GIL, on this thread and up to len(parts) - 1 workers (the
    plan makes as many parts as threads).
    With an ``interrupt`` (a field of the job its parts poll; this thread
    polls it too while it waits for the workers' parts), raise the
    exception a signal handler raised meanwhile; the call's outputs are then
    partial."""
    cdef Py_ssize_t p, i
    cdef int nparts = len(parts)
    cdef fastrnn_poll_fn poll = NULL if interrupt == NULL else <fastrnn_poll_fn>_poll_while_waiting
    if nparts < 1 or nparts > MAX_PARTS:
        raise ValueError(f"run_parts: expected 1 to {MAX_PARTS} parts, got {nparts}")
    if interrupt != NULL:
        interrupt_start(interrupt)
    for p in range(nparts):
        for i in range(width):
            ranges[p * width + i] = parts[p][i]
    with nogil:
        fastrnn_run_parts(<fastrnn_job_fn>fn, arg, nparts, nparts - 1, poll, interrupt)
    if interrupt != NULL:
        raise_if_interrupted(interrupt)
    return 0


# --- for the tests: parts of known lengths ---

cdef struct _BusyJob:
    Py_ssize_t ranges[MAX_PARTS]       # run_parts' copy of each part's index
    long long ns[MAX_PARTS]
    unsigned long long thread[MAX_PARTS]
    Interrupt interrupt


cdef void _busy_part(void* arg, int part) noexcept nogil:
    cdef _BusyJob* j = <_BusyJob*>arg
    cdef Py_ssize_t p = j.ranges[part]
    cdef long long end = fastrnn_clock_ns() + j.ns[p]
    j.thread[p] = fastrnn_thread_id()
    while fastrnn_clock_ns() < end:     # "steps" of a few clock readings
        if interrupted(&j.interrupt):
            return


def busy_parts(seconds):
    """For the tests: run_parts over parts that each spin for seconds[p]
    (polling the interrupt as a kernel's steps do), as a kernel entry's
    parts run; returns per part whether a worker ran it. A pending signal
    handler's exception is raised as from a kernel."""
    cdef _BusyJob job
    cdef Py_ssize_t p, n = len(seconds)
    if not 1 <= n <= MAX_PARTS:
        raise ValueError(f"busy_parts: expected 1 to {MAX_PARTS} parts, got {n}")
    for p in range(n):
        job.ns[p] = <long long>(seconds[p] * 1e9)
        job.thread[p] = 0
    run_parts(_busy_part, &job, &job.ranges[0], 1, [(p,) for p in range(n)], &job.interrupt)
    caller = fastrnn_thread_id()
    return [job.thread[p] != caller for p in range(n)]

