# The kernels' one worker thread (implemented in _worker.h, exported by
# _worker.pyx so that every kernel module shares the same thread).

ctypedef void (*job_fn)(void* arg, int part) noexcept nogil

cdef void run_two(job_fn fn, void* arg) noexcept nogil
cdef bint run_pair(job_fn fn, void* arg, long long wait_ns) noexcept nogil
cdef void cpu_pause() noexcept nogil
cdef int run_parts(job_fn fn, void* arg, Py_ssize_t* ranges, Py_ssize_t width,
                   parts) except -1
