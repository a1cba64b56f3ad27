# The kernels' one worker thread: see _worker.h. Its functions live in this
# module only, so that the forward and backward kernels (and both their
# builds) share one thread; they reach them through _worker.pxd.

cdef extern from "_worker.h":
    ctypedef void (*fastrnn_job_fn)(void* arg, int part) noexcept nogil
    void fastrnn_run_two(fastrnn_job_fn fn, void* arg) noexcept nogil
    int fastrnn_run_pair(fastrnn_job_fn fn, void* arg, long long wait_ns) noexcept nogil
    void fastrnn_cpu_pause() noexcept nogil
    int fastrnn_worker_init() noexcept nogil
    struct fastrnn_worker_state "__typeof__(fastrnn_worker)":
        long by_worker, by_caller, withdrawn
    fastrnn_worker_state fastrnn_worker


def stats():
    """(parts the worker ran, parts callers ran themselves because the worker
    had not taken them in time, unit splits withdrawn): how often the second
    core really helped, since start (or fork). Counted without locks: about."""
    return fastrnn_worker.by_worker, fastrnn_worker.by_caller, fastrnn_worker.withdrawn


cdef void run_two(job_fn fn, void* arg) noexcept nogil:
    """fn(arg, 0) here and fn(arg, 1) on the worker if it takes it in time,
    else here too: for parts that do not wait for each other."""
    fastrnn_run_two(<fastrnn_job_fn>fn, arg)


cdef bint run_pair(job_fn fn, void* arg, long long wait_ns) noexcept nogil:
    """fn(arg, 0) here and fn(arg, 1) on the worker at the same time (parts
    that meet at barriers); False, having run nothing, when the worker is
    owned by another call or does not take the job within wait_ns."""
    return fastrnn_run_pair(<fastrnn_job_fn>fn, arg, wait_ns) != 0


cdef void cpu_pause() noexcept nogil:
    fastrnn_cpu_pause()


fastrnn_worker_init()   # the fork handler, before any call can claim the worker


cdef int run_parts(job_fn fn, void* arg, Py_ssize_t* ranges, Py_ssize_t width,
                   parts) except -1:
    """The dispatch of every two-part kernel entry: copy ``parts`` (one or two
    tuples of ``width`` values, (lo, hi) pairs) into the job's ranges (2 x
    width), then run fn without the GIL: part 0 alone, or both parts through
    run_two when the second part's ranges are all non-empty."""
    cdef Py_ssize_t p, i
    cdef bint two = len(parts) > 1
    for p in range(2):
        for i in range(width):
            ranges[p * width + i] = parts[p][i] if p < len(parts) else 0
    for i in range(0, width, 2):
        two = two and ranges[width + i + 1] > ranges[width + i]
    with nogil:
        if two:
            run_two(fn, arg)
        else:
            fn(arg, 0)
    return 0
