/* One worker thread, in C, for the two parts of a layer's time loops.
 *
 * The parts of a call (two directions, two halves of the batch, or two
 * halves of the hidden units that meet at a barrier every step) run as
 * fn(arg, 0) in the calling thread and fn(arg, 1) here. The worker never
 * touches Python, so it needs no GIL, and after a job it spins for
 * FASTRNN_WORKER_SPIN_NS watching for the next one before it sleeps: a
 * sleeping thread (and on a virtual machine, an idle core) takes tens of
 * microseconds or more to wake, which a call's second part would wait for.
 *
 * One caller at a time owns the worker (fastrnn_worker_claim); a caller
 * that cannot claim it runs both parts itself (or, for the unit split, the
 * whole layer in one thread). After fork() the child starts afresh. */
#ifndef FASTRNN_WORKER_H
#define FASTRNN_WORKER_H

#include <pthread.h>
#include <sched.h>
#include <time.h>

#define FASTRNN_WORKER_SPIN_NS 300000LL
#define FASTRNN_WAIT_SPINS 20000L

typedef void (*fastrnn_job_fn)(void* arg, int part);

static struct {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    long claimed;        /* 1 while a caller owns the worker */
    long posted;         /* jobs posted, and finished (done) */
    long done;
    int started;         /* the thread exists in this process */
    int failed;          /* it could not be started: callers run alone */
    int sleeping;        /* the thread waits on cond (guarded by mutex) */
    int atfork;          /* the fork handler is registered */
    fastrnn_job_fn fn;
    void* arg;
} fastrnn_worker = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static inline void fastrnn_cpu_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline long long fastrnn_clock_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void* fastrnn_worker_main(void* unused) {
    long seen = 0, spins;
    long long deadline;
    (void)unused;
    for (;;) {
        deadline = fastrnn_clock_ns() + FASTRNN_WORKER_SPIN_NS;
        spins = 0;
        while (__atomic_load_n(&fastrnn_worker.posted, __ATOMIC_ACQUIRE) == seen) {
            fastrnn_cpu_pause();
            if (++spins % 256 == 0 && fastrnn_clock_ns() > deadline) {
                pthread_mutex_lock(&fastrnn_worker.mutex);
                fastrnn_worker.sleeping = 1;
                while (__atomic_load_n(&fastrnn_worker.posted, __ATOMIC_ACQUIRE) == seen)
                    pthread_cond_wait(&fastrnn_worker.cond, &fastrnn_worker.mutex);
                fastrnn_worker.sleeping = 0;
                pthread_mutex_unlock(&fastrnn_worker.mutex);
            }
        }
        seen = __atomic_load_n(&fastrnn_worker.posted, __ATOMIC_ACQUIRE);
        fastrnn_worker.fn(fastrnn_worker.arg, 1);
        __atomic_store_n(&fastrnn_worker.done, seen, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void fastrnn_worker_after_fork(void) {
    /* the child has no worker thread; the parent's may have been mid-job */
    pthread_mutex_init(&fastrnn_worker.mutex, NULL);
    pthread_cond_init(&fastrnn_worker.cond, NULL);
    fastrnn_worker.claimed = 0;
    fastrnn_worker.posted = 0;
    fastrnn_worker.done = 0;
    fastrnn_worker.started = 0;
    fastrnn_worker.sleeping = 0;
}

/* Try to own the worker (starting it on first use); 0 if another caller
 * owns it or it cannot run. */
static int fastrnn_worker_claim(void) {
    long expected = 0;
    pthread_t thread;
    pthread_attr_t attr;
    if (fastrnn_worker.failed)
        return 0;
    if (!__atomic_compare_exchange_n(&fastrnn_worker.claimed, &expected, 1, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    if (!fastrnn_worker.started) {
        if (!fastrnn_worker.atfork) {
            if (pthread_atfork(NULL, NULL, fastrnn_worker_after_fork) != 0) {
                fastrnn_worker.failed = 1;
                __atomic_store_n(&fastrnn_worker.claimed, 0, __ATOMIC_RELEASE);
                return 0;
            }
            fastrnn_worker.atfork = 1;
        }
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&thread, &attr, fastrnn_worker_main, NULL) != 0) {
            pthread_attr_destroy(&attr);
            fastrnn_worker.failed = 1;
            __atomic_store_n(&fastrnn_worker.claimed, 0, __ATOMIC_RELEASE);
            return 0;
        }
        pthread_attr_destroy(&attr);
        fastrnn_worker.started = 1;
    }
    return 1;
}

/* With the worker claimed: fn(arg, 1) there, fn(arg, 0) here; returns when
 * both are done and releases the worker. */
static void fastrnn_worker_run(fastrnn_job_fn fn, void* arg) {
    long job, spins = 0;
    fastrnn_worker.fn = fn;
    fastrnn_worker.arg = arg;
    pthread_mutex_lock(&fastrnn_worker.mutex);
    job = fastrnn_worker.posted + 1;
    __atomic_store_n(&fastrnn_worker.posted, job, __ATOMIC_RELEASE);
    if (fastrnn_worker.sleeping)
        pthread_cond_signal(&fastrnn_worker.cond);
    pthread_mutex_unlock(&fastrnn_worker.mutex);
    fn(arg, 0);
    while (__atomic_load_n(&fastrnn_worker.done, __ATOMIC_ACQUIRE) != job) {
        if (++spins < FASTRNN_WAIT_SPINS)
            fastrnn_cpu_pause();
        else
            sched_yield();
    }
    __atomic_store_n(&fastrnn_worker.claimed, 0, __ATOMIC_RELEASE);
}

/* Both parts: on the worker when it can be claimed, else one after the
 * other here (for parts that do not wait for each other). */
static void fastrnn_run_two(fastrnn_job_fn fn, void* arg) {
    if (fastrnn_worker_claim()) {
        fastrnn_worker_run(fn, arg);
    } else {
        fn(arg, 0);
        fn(arg, 1);
    }
}

#endif
