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
 * whole layer in one thread). Part 1 goes to whoever takes it first: a
 * caller whose part 0 is done before the worker woke runs part 1 itself,
 * so a sleeping or descheduled worker never makes a call slower than one
 * thread. After fork() the child starts afresh. */
#ifndef FASTRNN_WORKER_H
#define FASTRNN_WORKER_H

#include <pthread.h>
#include <sched.h>
#include <errno.h>
#include <signal.h>
#include <time.h>

#define FASTRNN_WORKER_SPIN_NS 300000LL
#define FASTRNN_WAIT_SPINS 64L    /* pauses between yields while waiting for part 1 */

typedef void (*fastrnn_job_fn)(void* arg, int part);

static struct {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    long claimed;        /* 1 while a caller owns the worker */
    long posted;         /* id of the last job posted */
    long taken;          /* id of the last job whose part 1 someone took */
    long done;           /* id of the last job whose part 1 the worker finished */
    int started;         /* the thread exists in this process */
    int failed;          /* it could not be started: callers run alone */
    int sleeping;        /* the thread waits on cond (guarded by mutex) */
    int atfork;          /* the fork handler is registered (at import) */
    long by_worker;      /* parts 1 the worker ran, */
    long by_caller;      /* the callers ran themselves, */
    long withdrawn;      /* and unit splits withdrawn (statistics) */
    fastrnn_job_fn fn;
    void* arg;
} fastrnn_worker = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static inline void fastrnn_cpu_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* the interrupt flag of a call, read by every part of it (_worker.pxd) */
static inline int fastrnn_load_int(const int* p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void fastrnn_store_int(int* p, int v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline long long fastrnn_clock_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Take part 1 of job `job` (the worker or the caller, whoever comes first). */
static inline int fastrnn_take(long job) {
    long expected = job - 1;
    return __atomic_compare_exchange_n(&fastrnn_worker.taken, &expected, job, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static void* fastrnn_worker_main(void* unused) {
    long seen = 0, spins, job;
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
        job = __atomic_load_n(&fastrnn_worker.posted, __ATOMIC_ACQUIRE);
        seen = job;
        /* the job's fn and arg stay valid while its part 1 is untaken or ours */
        if (fastrnn_take(job)) {
            fastrnn_worker.by_worker++;
            fastrnn_worker.fn(fastrnn_worker.arg, 1);
            __atomic_store_n(&fastrnn_worker.done, job, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

static void fastrnn_worker_after_fork(void) {
    /* the child has no worker thread; the parent's may have been mid-job */
    pthread_mutex_init(&fastrnn_worker.mutex, NULL);
    pthread_cond_init(&fastrnn_worker.cond, NULL);
    fastrnn_worker.claimed = 0;
    fastrnn_worker.posted = 0;
    fastrnn_worker.taken = 0;
    fastrnn_worker.done = 0;
    fastrnn_worker.started = 0;
    fastrnn_worker.sleeping = 0;
}

/* At import: the fork handler, registered before any caller can claim the
 * worker (a fork between a claim and the registration would leave the
 * child's worker claimed for ever). 0 on failure: callers then run alone. */
static int fastrnn_worker_init(void) {
    if (pthread_atfork(NULL, NULL, fastrnn_worker_after_fork) != 0) {
        fastrnn_worker.failed = 1;
        return 0;
    }
    fastrnn_worker.atfork = 1;
    return 1;
}

/* Try to own the worker (starting it on first use); 0 if another caller
 * owns it or it cannot run. */
static int fastrnn_worker_claim(void) {
    long expected = 0;
    pthread_t thread;
    pthread_attr_t attr;
    sigset_t all, old;
    int err;
    if (__atomic_load_n(&fastrnn_worker.failed, __ATOMIC_RELAXED) || !fastrnn_worker.atfork)
        return 0;
    if (!__atomic_compare_exchange_n(&fastrnn_worker.claimed, &expected, 1, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    if (!fastrnn_worker.started) {
        /* the thread takes no signals: they stay with the program's threads */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        err = pthread_create(&thread, &attr, fastrnn_worker_main, NULL);
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (err != 0) {
            /* EAGAIN (a thread limit) may pass: try again on a later call */
            if (err != EAGAIN)
                __atomic_store_n(&fastrnn_worker.failed, 1, __ATOMIC_RELAXED);
            __atomic_store_n(&fastrnn_worker.claimed, 0, __ATOMIC_RELEASE);
            return 0;
        }
        fastrnn_worker.started = 1;
    }
    return 1;
}

static void fastrnn_release(void) {
    __atomic_store_n(&fastrnn_worker.claimed, 0, __ATOMIC_RELEASE);
}

/* With the worker claimed: offer fn(arg, 1) to the worker; returns the job id. */
static long fastrnn_post(fastrnn_job_fn fn, void* arg) {
    long job;
    fastrnn_worker.fn = fn;
    fastrnn_worker.arg = arg;
    pthread_mutex_lock(&fastrnn_worker.mutex);
    job = fastrnn_worker.posted + 1;
    __atomic_store_n(&fastrnn_worker.posted, job, __ATOMIC_RELEASE);
    if (fastrnn_worker.sleeping)
        pthread_cond_signal(&fastrnn_worker.cond);
    pthread_mutex_unlock(&fastrnn_worker.mutex);
    return job;
}

/* Wait until the worker has finished part 1 of `job`. */
static void fastrnn_wait_done(long job) {
    long spins = 0;
    while (__atomic_load_n(&fastrnn_worker.done, __ATOMIC_ACQUIRE) != job) {
        if (++spins % FASTRNN_WAIT_SPINS)
            fastrnn_cpu_pause();
        else
            sched_yield();
    }
}

/* Parts that do not wait for each other: fn(arg, 0) here while the worker
 * may take fn(arg, 1); if it has not taken it by the time part 0 is done
 * (asleep, or its core busy), this thread runs part 1 as well. */
static void fastrnn_run_two(fastrnn_job_fn fn, void* arg) {
    long job;
    if (!fastrnn_worker_claim()) {
        fn(arg, 0);
        fn(arg, 1);
        return;
    }
    job = fastrnn_post(fn, arg);
    fn(arg, 0);
    if (fastrnn_take(job)) {
        fastrnn_worker.by_caller++;
        fn(arg, 1);
    } else
        fastrnn_wait_done(job);
    fastrnn_release();
}

/* Parts that meet at barriers: both must run at once. Offers part 1 to the
 * worker and waits up to wait_ns for it to take it; returns 0 (having run
 * nothing) if it did not, else runs part 0 here and returns 1 when both
 * are done. */
static int fastrnn_run_pair(fastrnn_job_fn fn, void* arg, long long wait_ns) {
    long job, spins;
    long long deadline;
    if (!fastrnn_worker_claim())
        return 0;
    job = fastrnn_post(fn, arg);
    deadline = fastrnn_clock_ns() + wait_ns;
    spins = 0;
    while (__atomic_load_n(&fastrnn_worker.taken, __ATOMIC_ACQUIRE) != job) {
        /* yield now and then: a worker woken on this core needs it */
        if (++spins % 1024 == 0)
            sched_yield();
        else
            fastrnn_cpu_pause();
        if (fastrnn_clock_ns() > deadline && fastrnn_take(job)) {
            fastrnn_worker.withdrawn++;
            fastrnn_release();   /* withdrawn: nobody runs it */
            return 0;
        }
    }
    fn(arg, 0);
    fastrnn_wait_done(job);
    fastrnn_release();
    return 1;
}

#endif
