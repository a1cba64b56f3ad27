# The kernels' worker threads (implemented in _worker.h, exported by
# _worker.pyx so that every kernel module shares the same pool).

ctypedef void (*job_fn)(void* arg, int part) noexcept nogil

cdef enum:
    MAX_PARTS = 64            # parts of one job (= fastrnn's most threads)

# a team job: 0 not run (the workers busy or slow), 1 done, 2 done but contended
cdef int run_team(job_fn fn, void* arg, int nparts, long long wait_ns,
                  const long long* waits) noexcept nogil

# the parts of a team job (run_team) that meet after every step: each part's
# step count in its own slot of SYNC_SLOT long longs (128 bytes, never a
# shared cache line); team_barrier publishes one and waits for the others,
# team_publish only publishes, wait_for_part waits for one other.
# TEAM_SYNC: the long longs of a team's slots (the most parts' and
# team_barrier's stop_at), which a caller aligns to 128 bytes.
cdef enum:
    SYNC_SLOT = 16
    TEAM_SYNC = (MAX_PARTS + 1) * SYNC_SLOT

# wait until another part's count is at least ``steps`` (ns waited)
cdef long long wait_for_part(long long* slots, int other, long long steps) noexcept nogil
# a team's slots in raw ((nparts + 1) * SYNC_SLOT + 16 long longs): aligned, zeroed
cdef long long* team_slots(long long* raw, int nparts) noexcept nogil
# whether bounds split H units in 2 to MAX_PARTS rising parts, inner bounds multiples of width
cdef bint unit_bounds_fit(bounds, Py_ssize_t H, Py_ssize_t width) except -1
# raise ValueError unless unit_bounds_fit
cdef int check_unit_bounds(str owner, bounds, Py_ssize_t H, Py_ssize_t width) except -1

# A long call's time loops look at ``interrupted`` once per step: the thread
# that made the call (when it is Python's main thread) takes the GIL every
# INTERRUPT_POLL_NS or so to run the signal handlers (Ctrl-C), and a handler
# that raised stops every part of the call at its next step.
cdef struct Interrupt:
    int stop                  # a handler raised: every part leaves its loop
    bint polls                # the caller is Python's main thread
    unsigned long long caller # its thread id (threading.get_ident()): only it polls
    int countdown             # steps until it next reads the clock
    long long next_ns         # when it next takes the GIL
    unsigned int fpenv        # the caller's FP environment, its signal handlers' (_fpenv.h)

# a long call's large products run in blocks of INTERRUPT_BLOCK_MACS
# multiply-adds (_tuning.h), between which it looks at ``interrupted`` too
from fastrnn._tuning cimport INTERRUPT_BLOCK_MACS

cdef void interrupt_start(Interrupt* it) noexcept nogil   # a call's, before its parts run
cdef bint interrupted(Interrupt* it, bint read_clock=*) noexcept nogil
# the barrier of a team job a signal may stop (slots: nparts + 1 slots, the
# last for the barrier every part stops at): all leave after the same step
cdef bint team_barrier(long long* slots, int part, int nparts, long long steps,
                       Interrupt* it, long long* waits) noexcept nogil
# team_barrier's publishing without its wait, and the stop a part learns
# after waiting for part 0 (wait_for_part): parts that read one another's
# output part by part, each waiting only for the part it reads next
cdef bint team_publish(long long* slots, int part, int nparts, long long steps,
                       Interrupt* it) noexcept nogil
cdef bint team_stops(long long* slots, int nparts, long long steps) noexcept nogil
cdef int raise_if_interrupted(Interrupt* it) except -1
cdef Py_ssize_t interrupt_block_rows(Py_ssize_t macs_per_row, Py_ssize_t max_rows) noexcept nogil
cdef int run_parts(job_fn fn, void* arg, Py_ssize_t* ranges, Py_ssize_t width,
                   parts, Interrupt* interrupt=*) except -1
