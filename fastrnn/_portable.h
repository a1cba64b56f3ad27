/* What the kernels need from the compiler and the operating system, in one
 * place, for GCC and Clang (Linux, macOS, MinGW; any CPU) and MSVC (Windows
 * x86-64, ARM64): atomics, a prefetch hint, a register hold for SIMD
 * kernels, a spin-wait hint, yielding, a
 * monotonic clock, the calling thread's id, and the worker threads' mutex,
 * condition variable, thread start and fork handler.
 *
 * Atomics: GCC's __atomic builtins; under MSVC, volatile accesses fenced
 * against the compiler on x86-64 (whose loads and stores are already
 * acquire and release) and Interlocked functions, full barriers, elsewhere.
 * Counters that must not wrap are long long: a Windows long has 32 bits.
 * Threads: POSIX, or Win32 under _WIN32 (slim reader/writer lock, condition
 * variable, _beginthreadex; there is no fork there). */
#ifndef FASTRNN_PORTABLE_H
#define FASTRNN_PORTABLE_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "_tuning.h"   /* FASTRNN_WAIT_SPINS */

#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <windows.h>
#include <process.h>
#else
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#define FASTRNN_MSVC 1
#endif

/* --- atomics ------------------------------------------------------------ */

#if defined(FASTRNN_MSVC) && defined(_M_X64)
static __forceinline int fastrnn_load_acquire_int(const int* p) {
    int v = *(const volatile int*)p;
    _ReadWriteBarrier();
    return v;
}
static __forceinline long long fastrnn_load_acquire_ll(const long long* p) {
    long long v = *(const volatile long long*)p;
    _ReadWriteBarrier();
    return v;
}
static __forceinline void fastrnn_store_release_int(int* p, int v) {
    _ReadWriteBarrier();
    *(volatile int*)p = v;
}
static __forceinline void fastrnn_store_release_ll(long long* p, long long v) {
    _ReadWriteBarrier();
    *(volatile long long*)p = v;
}
#elif defined(FASTRNN_MSVC)
static __forceinline int fastrnn_load_acquire_int(const int* p) {
    return (int)_InterlockedOr((volatile long*)p, 0);
}
static __forceinline long long fastrnn_load_acquire_ll(const long long* p) {
    return _InterlockedOr64((volatile long long*)p, 0);
}
static __forceinline void fastrnn_store_release_int(int* p, int v) {
    _InterlockedExchange((volatile long*)p, v);
}
static __forceinline void fastrnn_store_release_ll(long long* p, long long v) {
    _InterlockedExchange64((volatile long long*)p, v);
}
#else
static inline int fastrnn_load_acquire_int(const int* p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline long long fastrnn_load_acquire_ll(const long long* p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void fastrnn_store_release_int(int* p, int v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void fastrnn_store_release_ll(long long* p, long long v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
#endif

/* an int flag that needs no ordering (aligned int accesses are atomic) */
static inline int fastrnn_load_int(const int* p) {
#if defined(FASTRNN_MSVC)
    return *(const volatile int*)p;
#else
    return __atomic_load_n(p, __ATOMIC_RELAXED);
#endif
}
static inline void fastrnn_store_int(int* p, int v) {
#if defined(FASTRNN_MSVC)
    *(volatile int*)p = v;
#else
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
#endif
}

/* *p = desired if *p == *expected (acquire and release), else *expected =
 * *p; whether it stored (a strong compare-and-swap: it fails only when *p
 * differs) */
static inline int fastrnn_cas_ll(long long* p, long long* expected, long long desired) {
#if defined(FASTRNN_MSVC)
    long long seen = _InterlockedCompareExchange64((volatile long long*)p, desired, *expected);
    if (seen == *expected)
        return 1;
    *expected = seen;
    return 0;
#else
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
#endif
}

/* *p += v (acquire and release); the new value */
static inline long long fastrnn_add_fetch_ll(long long* p, long long v) {
#if defined(FASTRNN_MSVC)
    return _InterlockedExchangeAdd64((volatile long long*)p, v) + v;
#else
    return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL);
#endif
}

/* --- prefetching --------------------------------------------------------- */

/* Ask for every 64-byte cache line of [p, p + bytes) in L2 ahead of its
 * use, to read (for_write = 0) or to write (1); a hint, never a fault.
 * MSVC: the read hint on x86 whatever for_write says; a no-op on ARM64. */
static inline void fastrnn_prefetch_l2(const void* p, ptrdiff_t bytes, int for_write) {
    const char* first = (const char*)p;
    const char* end = first + bytes;
    /* from the line that holds p: a row need not start on a line */
    const char* line = first - ((uintptr_t)first & 63u);
    for (; line < end; line += 64) {
#if defined(FASTRNN_MSVC) && (defined(_M_X64) || defined(_M_IX86))
        _mm_prefetch(line, _MM_HINT_T1);
        (void)for_write;
#elif defined(FASTRNN_MSVC)
        (void)line; (void)for_write;
#else
        if (for_write) __builtin_prefetch(line, 1, 2);
        else __builtin_prefetch(line, 0, 2);
#endif
    }
}

/* --- a vector held in a register ---------------------------------------- */

/* FASTRNN_HOLD(v): an empty asm (GCC, Clang on x86) that tells the
 * compiler the SIMD vector v changed, so v is a value it must keep in a
 * register: the kernels' tiles load each weight vector once a step of k
 * for all their rows (GCC otherwise folded the loads of the 2- and 3-row
 * tiles into each row's multiply-add, _microkernel.h says what that cost),
 * and the peak loops keep their operands from being hoisted. MSVC has no
 * such statement: nothing there. */
#if defined(__GNUC__) && defined(__AVX512F__)
#define FASTRNN_HOLD(v) __asm__("" : "+v"(v))
#elif defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTRNN_HOLD(v) __asm__("" : "+x"(v))
#else
#define FASTRNN_HOLD(v) ((void)0)
#endif

/* --- waiting ------------------------------------------------------------ */

/* a hint inside a spin-wait loop */
static inline void fastrnn_cpu_pause(void) {
#if defined(FASTRNN_MSVC) && (defined(_M_X64) || defined(_M_IX86))
    _mm_pause();
#elif defined(FASTRNN_MSVC) && defined(_M_ARM64)
    __yield();
#elif defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield");
#endif
}

/* give the CPU to another thread that is ready to run, if any */
static inline void fastrnn_yield(void) {
#if defined(_WIN32)
    SwitchToThread();
#else
    sched_yield();
#endif
}

/* One turn of a wait for another thread: a pause, and every
 * FASTRNN_WAIT_SPINS turns (_tuning.h) a yield, in case that thread waits
 * for this core. *spins counts the turns. */
static inline void fastrnn_wait_spin(long long* spins) {
    if (++*spins % FASTRNN_WAIT_SPINS)
        fastrnn_cpu_pause();
    else
        fastrnn_yield();
}

/* nanoseconds of a monotonic clock */
static inline long long fastrnn_clock_ns(void) {
#if defined(_WIN32)
    static LARGE_INTEGER frequency;     /* fixed at boot; a race writes the same value */
    LARGE_INTEGER now;
    if (frequency.QuadPart == 0)
        QueryPerformanceFrequency(&frequency);
    QueryPerformanceCounter(&now);
    return (now.QuadPart / frequency.QuadPart) * 1000000000LL
           + (now.QuadPart % frequency.QuadPart) * 1000000000LL / frequency.QuadPart;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
#endif
}

/* The CPU the calling thread runs on, or -1 where that is not known
 * (Linux only: Python.h defines _GNU_SOURCE there, before this file). */
static inline int fastrnn_current_cpu(void) {
#if defined(__linux__) && defined(_GNU_SOURCE)
    return sched_getcpu();
#else
    return -1;
#endif
}

/* Move the calling thread off `cpu` to another CPU it may run on, its
 * affinity unchanged in the end: narrowed to the other CPUs (Linux
 * migrates the thread at once), then restored (the thread stays where it
 * now runs). *moved_to (if not NULL) gets the CPU it ran on while
 * narrowed. Returns 1 if it moved and its affinity is whole again; 0 if
 * nothing happened (unsupported, no other CPU allowed) or the restore
 * failed twice (then the thread keeps the narrowed set: still CPUs it was
 * allowed). An affinity set by someone else between the read and the
 * restore is overwritten: the window is two system calls long. */
static inline int fastrnn_move_off_cpu(int cpu, int* moved_to) {
#if defined(__linux__) && defined(_GNU_SOURCE)
    cpu_set_t allowed, others;
    if (moved_to != NULL)
        *moved_to = -1;
    if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getaffinity(0, sizeof allowed, &allowed) != 0)
        return 0;
    others = allowed;
    CPU_CLR(cpu, &others);
    if (CPU_COUNT(&others) == 0 || sched_setaffinity(0, sizeof others, &others) != 0)
        return 0;
    if (moved_to != NULL)
        *moved_to = sched_getcpu();
    return sched_setaffinity(0, sizeof allowed, &allowed) == 0
           || sched_setaffinity(0, sizeof allowed, &allowed) == 0;
#else
    (void)cpu;
    if (moved_to != NULL)
        *moved_to = -1;
    return 0;
#endif
}

/* --- steering a sleeping thread's wake-up off the waker's CPU (Linux) ---
 * A thread woken by another is placed on the waker's CPU when the kernel
 * finds that cheap (wake-affine), and there it waits, runnable, until the
 * waker gives up the CPU: 1 to 10 ms on this project's 2-vCPU VM after a
 * pause (a worker took none of the parts of 5 to 20 consecutive calls). The
 * waker narrows the sleeper's affinity to the other CPUs it may use just
 * before the wake-up, and the woken thread restores it at once; the kernel
 * must then wake it elsewhere. */
#if defined(__linux__) && defined(_GNU_SOURCE)
#include <sys/syscall.h>
#include <unistd.h>
typedef struct {
    int tid;             /* the thread's kernel id (0: unknown) */
    int narrowed;        /* its affinity is narrowed: `restore` holds its own */
    cpu_set_t restore;
} fastrnn_steer;

static inline void fastrnn_steer_init(fastrnn_steer* self) {
    self->tid = (int)syscall(SYS_gettid);
    self->narrowed = 0;
}

/* By the waker: keep the sleeper `other` off `cpu` (1 if narrowed). */
static inline int fastrnn_steer_off(fastrnn_steer* other, int cpu) {
    cpu_set_t others;
    if (other->tid == 0 || other->narrowed || cpu < 0 || cpu >= CPU_SETSIZE
            || sched_getaffinity(other->tid, sizeof other->restore, &other->restore) != 0
            || !CPU_ISSET(cpu, &other->restore) || CPU_COUNT(&other->restore) < 2)
        return 0;
    others = other->restore;
    CPU_CLR(cpu, &others);
    if (sched_setaffinity(other->tid, sizeof others, &others) != 0)
        return 0;
    other->narrowed = 1;
    return 1;
}

/* By the woken thread itself: its own affinity back (an affinity set by
 * someone else between the narrowing and this is overwritten). */
static inline void fastrnn_steer_restore(fastrnn_steer* self) {
    if (self->narrowed && sched_setaffinity(0, sizeof self->restore, &self->restore) == 0)
        self->narrowed = 0;
}
#else
typedef struct { int narrowed; } fastrnn_steer;
static inline void fastrnn_steer_init(fastrnn_steer* self) { self->narrowed = 0; }
static inline int fastrnn_steer_off(fastrnn_steer* other, int cpu) {
    (void)other;
    (void)cpu;
    return 0;
}
static inline void fastrnn_steer_restore(fastrnn_steer* self) { (void)self; }
#endif

/* the calling thread's id, as Python's threading.get_ident() gives it
 * (pthread_t is an integer on Linux, a pointer on macOS; Windows: the
 * thread id) */
static inline unsigned long long fastrnn_thread_id(void) {
#if defined(_WIN32)
    return (unsigned long long)GetCurrentThreadId();
#else
    return (unsigned long long)(uintptr_t)pthread_self();
#endif
}

/* --- threads ------------------------------------------------------------ */

#if defined(_WIN32)
typedef SRWLOCK fastrnn_mutex;
typedef CONDITION_VARIABLE fastrnn_cond;
#define FASTRNN_MUTEX_INIT SRWLOCK_INIT
#define FASTRNN_COND_INIT CONDITION_VARIABLE_INIT
static inline void fastrnn_mutex_lock(fastrnn_mutex* m) { AcquireSRWLockExclusive(m); }
static inline void fastrnn_mutex_unlock(fastrnn_mutex* m) { ReleaseSRWLockExclusive(m); }
static inline void fastrnn_cond_wait(fastrnn_cond* c, fastrnn_mutex* m) {
    SleepConditionVariableSRW(c, m, INFINITE, 0);
}
static inline void fastrnn_cond_broadcast(fastrnn_cond* c) { WakeAllConditionVariable(c); }
static inline void fastrnn_mutex_reset(fastrnn_mutex* m) { InitializeSRWLock(m); }
static inline void fastrnn_cond_reset(fastrnn_cond* c) { InitializeConditionVariable(c); }
/* a thread's main function: FASTRNN_THREAD_MAIN(name, arg) { ... return 0; } */
#define FASTRNN_THREAD_MAIN(name, arg) static unsigned __stdcall name(void* arg)
typedef unsigned (__stdcall *fastrnn_thread_main)(void*);
#else
typedef pthread_mutex_t fastrnn_mutex;
typedef pthread_cond_t fastrnn_cond;
#define FASTRNN_MUTEX_INIT PTHREAD_MUTEX_INITIALIZER
#define FASTRNN_COND_INIT PTHREAD_COND_INITIALIZER
static inline void fastrnn_mutex_lock(fastrnn_mutex* m) { pthread_mutex_lock(m); }
static inline void fastrnn_mutex_unlock(fastrnn_mutex* m) { pthread_mutex_unlock(m); }
static inline void fastrnn_cond_wait(fastrnn_cond* c, fastrnn_mutex* m) {
    pthread_cond_wait(c, m);
}
static inline void fastrnn_cond_broadcast(fastrnn_cond* c) { pthread_cond_broadcast(c); }
/* made anew (in a forked child, whose copy may have been held) */
static inline void fastrnn_mutex_reset(fastrnn_mutex* m) { pthread_mutex_init(m, NULL); }
static inline void fastrnn_cond_reset(fastrnn_cond* c) { pthread_cond_init(c, NULL); }
#define FASTRNN_THREAD_MAIN(name, arg) static void* name(void* arg)
typedef void* (*fastrnn_thread_main)(void*);
#endif

/* Start a detached thread running main(arg), with at least 1 MiB of stack
 * (musl's default is 128 KiB, macOS's 512 KiB; glibc's 8 MiB and Windows'
 * 1 MiB stay) and, on POSIX, every signal blocked: signals
 * stay with the program's own threads. 0, or an errno value (EAGAIN: a
 * thread limit, which may pass). */
static inline int fastrnn_thread_start(fastrnn_thread_main main, void* arg) {
#if defined(_WIN32)
    uintptr_t handle = _beginthreadex(NULL, 1u << 20, main, arg, 0, NULL);
    if (handle == 0)
        return errno != 0 ? errno : EAGAIN;
    CloseHandle((HANDLE)handle);
    return 0;
#else
    pthread_t thread;
    pthread_attr_t attr;
    sigset_t all, old;
    size_t stack = 0;
    int err;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_attr_getstacksize(&attr, &stack) == 0 && stack < ((size_t)1 << 20))
        pthread_attr_setstacksize(&attr, (size_t)1 << 20);
    err = pthread_create(&thread, &attr, main, arg);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return err;
#endif
}

/* Register child() to run in the child after fork(); 0 on success. Windows
 * has no fork: nothing to do. */
static inline int fastrnn_atfork_child(void (*child)(void)) {
#if defined(_WIN32)
    (void)child;
    return 0;
#else
    return pthread_atfork(NULL, NULL, child);
#endif
}

#endif
