/* The kernels' worker threads, in C: a pool of up to FASTRNN_MAX_THREADS - 1
 * threads that run the parts of a call beside the calling thread.
 *
 * A call's work comes as ``nparts`` parts fn(arg, part). The calling thread
 * posts the job and takes parts like any worker; each part goes to whoever
 * takes it first (an atomic ticket holding the job's id and the next part),
 * so a sleeping or descheduled worker never makes a call slower than its
 * caller alone, and what a part computes never depends on who runs it.
 * The workers never touch Python (no GIL); after a job they spin for
 * FASTRNN_WORKER_SPIN_NS watching for the next before they sleep, since a
 * sleeping thread (and on a virtual machine an idle core) takes tens of
 * microseconds or more to wake.
 *
 * A team job (fastrnn_run_team) is one whose parts meet at barriers, so all
 * of them must run at once: the caller waits up to wait_ns for the workers
 * to take every part, then lets them go; if they do not, it withdraws the
 * job and nothing runs (the caller then runs the work another way).
 *
 * A caller that wakes sleeping workers first narrows their affinity to the
 * CPUs but its own, and each restores its own once awake: the kernel would
 * often wake them on the caller's CPU, where they wait for it for
 * milliseconds (_portable.h, fastrnn_steer_off).
 *
 * One caller at a time owns the pool (fastrnn_pool_claim); another caller
 * meanwhile runs all its parts itself. The workers take no signals. After
 * fork() the child starts afresh (no threads; the handler is registered at
 * import, before any claim). The threads, atomics and clock come from
 * _portable.h (POSIX or Win32; GCC, Clang or MSVC). */
#ifndef FASTRNN_WORKER_H
#define FASTRNN_WORKER_H

#include <errno.h>

#include "_portable.h"

#define FASTRNN_MAX_THREADS 64
#include "_tuning.h"   /* FASTRNN_WORKER_SPIN_NS */
/* the ticket, one atomic word: job id << 16 | parts << 8 | next part. The
 * part count travels with the id: read apart, a worker between two jobs
 * could pair the old job's id with the new job's count */
#define FASTRNN_PART_BITS 8
#define FASTRNN_PART_MASK ((1LL << FASTRNN_PART_BITS) - 1)

typedef void (*fastrnn_job_fn)(void* arg, int part);

/* long long throughout: a Windows long has 32 bits, and the ticket's job id
 * must not wrap */
typedef struct {
    fastrnn_mutex mutex;
    fastrnn_cond cond;
    long long claimed;     /* 1 while a caller owns the pool */
    long long posted;      /* id of the last job posted */
    long long ticket;      /* posted job's id << 16 | its parts << 8 | next part */
    long long remaining;   /* parts of the posted job not finished */
    int nparts;            /* parts of the posted job */
    int team;              /* its parts wait for ``go`` (barrier jobs) */
    int go;                /* team job: 1 run, -1 withdrawn, 0 wait */
    int started;           /* worker threads that exist in this process */
    int failed;            /* threads could not be started: callers run alone */
    int sleeping;          /* workers waiting on cond (guarded by mutex) */
    int atfork;            /* the fork handler is registered (at import) */
    long long by_worker;   /* parts the workers ran, */
    long long by_caller;   /* the callers ran, */
    long long withdrawn;   /* team jobs withdrawn, */
    long long moved;       /* and workers moved off the caller's CPU (statistics,
                              unsynchronised) */
    int caller_cpu;        /* the CPU the posting caller ran on (-1: unknown; read
                              only after a post has set it) */
    int registered;        /* workers with a slot below (guarded by mutex) */
    int asleep[FASTRNN_MAX_THREADS];         /* slot i's worker waits on cond */
    fastrnn_steer steer[FASTRNN_MAX_THREADS];   /* where slot i's wakes (by mutex) */
    long long steered;     /* wake-ups steered off the caller's CPU (statistics) */
    fastrnn_job_fn fn;
    void* arg;
} fastrnn_worker_t;

static fastrnn_worker_t fastrnn_worker = {FASTRNN_MUTEX_INIT, FASTRNN_COND_INIT};

/* Take the next part of job `job`: its number, or -1 when none is left
 * (or the job is over). */
static inline int fastrnn_take(long long job) {
    long long ticket = fastrnn_load_acquire_ll(&fastrnn_worker.ticket);
    for (;;) {
        if ((ticket >> (2 * FASTRNN_PART_BITS)) != job)
            return -1;
        if ((ticket & FASTRNN_PART_MASK) >= ((ticket >> FASTRNN_PART_BITS) & FASTRNN_PART_MASK))
            return -1;
        if (fastrnn_cas_ll(&fastrnn_worker.ticket, &ticket, ticket + 1))
            return (int)(ticket & FASTRNN_PART_MASK);
    }
}

/* Run the parts of `job` this thread takes; a team part first waits for
 * ``go`` (and runs nothing if the job was withdrawn). */
static void fastrnn_run_taken(long long job, int by_worker) {
    int part;
    long long spins;
    while ((part = fastrnn_take(job)) >= 0) {
        if (fastrnn_worker.team) {
            spins = 0;
            while (fastrnn_load_acquire_int(&fastrnn_worker.go) == 0)
                fastrnn_wait_spin(&spins);
            if (fastrnn_load_acquire_int(&fastrnn_worker.go) < 0) {
                fastrnn_add_fetch_ll(&fastrnn_worker.remaining, -1);
                continue;
            }
        }
        if (by_worker)
            fastrnn_worker.by_worker++;
        else
            fastrnn_worker.by_caller++;
        fastrnn_worker.fn(fastrnn_worker.arg, part);
        fastrnn_add_fetch_ll(&fastrnn_worker.remaining, -1);
    }
}

/* A worker woken from sleep may find itself on its caller's CPU: on a
 * virtual machine Linux takes an idle vCPU for a preempted one and wakes
 * the thread on the waker's CPU, where the two share one core until the
 * idle CPU pulls the worker over, 1 to 10 ms later (seen with perf sched
 * on this project's 2-vCPU VM: after a pause, calls ran at 2x their time,
 * slower than one thread, for whole blocks of calls). Such a worker moves
 * itself to another CPU before it takes a part. */
static void fastrnn_leave_callers_cpu(void) {
    int caller = fastrnn_load_int(&fastrnn_worker.caller_cpu);
    if (caller >= 0 && fastrnn_current_cpu() == caller && fastrnn_move_off_cpu(caller, NULL))
        fastrnn_worker.moved++;
}

FASTRNN_THREAD_MAIN(fastrnn_worker_main, unused) {
    long long seen = 0, spins, job;
    long long deadline;
    int slept = 1;         /* a new thread, too, starts where the scheduler put it */
    int slot;
    (void)unused;
    fastrnn_mutex_lock(&fastrnn_worker.mutex);
    slot = fastrnn_worker.registered++;
    /* (after a fork the slot may hold a parent's worker's asleep = 1: a
     * caller would narrow this one while it runs) */
    fastrnn_worker.asleep[slot] = 0;
    fastrnn_steer_init(&fastrnn_worker.steer[slot]);
    fastrnn_mutex_unlock(&fastrnn_worker.mutex);
    for (;;) {
        deadline = fastrnn_clock_ns() + FASTRNN_WORKER_SPIN_NS;
        spins = 0;
        while (fastrnn_load_acquire_ll(&fastrnn_worker.posted) == seen) {
            /* pauses, and a yield now and then: with more threads than
             * cores the caller may be waiting for this core */
            fastrnn_wait_spin(&spins);
            if (spins % 256 == 0 && fastrnn_clock_ns() > deadline) {
                fastrnn_mutex_lock(&fastrnn_worker.mutex);
                fastrnn_worker.sleeping++;
                fastrnn_worker.asleep[slot] = 1;
                while (fastrnn_load_acquire_ll(&fastrnn_worker.posted) == seen)
                    fastrnn_cond_wait(&fastrnn_worker.cond, &fastrnn_worker.mutex);
                fastrnn_worker.asleep[slot] = 0;
                fastrnn_worker.sleeping--;
                fastrnn_steer_restore(&fastrnn_worker.steer[slot]);
                fastrnn_mutex_unlock(&fastrnn_worker.mutex);
                slept = 1;
            }
        }
        job = fastrnn_load_acquire_ll(&fastrnn_worker.posted);
        seen = job;
        if (slept)
            fastrnn_leave_callers_cpu();
        slept = 0;
        /* fn and arg stay valid while a part of the job is ours */
        fastrnn_run_taken(job, 1);
    }
    return 0;
}

static void fastrnn_worker_after_fork(void) {
    /* the child has no worker threads; the parent's may have been mid-job */
    fastrnn_mutex_reset(&fastrnn_worker.mutex);
    fastrnn_cond_reset(&fastrnn_worker.cond);
    fastrnn_worker.claimed = 0;
    fastrnn_worker.posted = 0;
    fastrnn_worker.ticket = 0;
    fastrnn_worker.remaining = 0;
    fastrnn_worker.started = 0;
    fastrnn_worker.sleeping = 0;
    fastrnn_worker.registered = 0;
}

/* At import: the fork handler, registered before any caller can claim the
 * pool (a fork between a claim and the registration would leave the
 * child's pool claimed for ever; Windows has no fork). 0 on failure:
 * callers then run alone. */
static int fastrnn_worker_init(void) {
    if (fastrnn_atfork_child(fastrnn_worker_after_fork) != 0) {
        fastrnn_worker.failed = 1;
        return 0;
    }
    fastrnn_worker.atfork = 1;
    fastrnn_worker.caller_cpu = -1;
    return 1;
}

/* Try to own the pool with at least `workers` threads (started on first
 * use); returns the number of workers available (0: run alone). */
static int fastrnn_pool_claim(int workers) {
    long long expected = 0;
    int err;
    if (workers > FASTRNN_MAX_THREADS - 1)
        workers = FASTRNN_MAX_THREADS - 1;
    if (workers < 1 || fastrnn_load_int(&fastrnn_worker.failed) || !fastrnn_worker.atfork)
        return 0;
    if (!fastrnn_cas_ll(&fastrnn_worker.claimed, &expected, 1))
        return 0;
    while (fastrnn_worker.started < workers) {
        /* detached; on POSIX the threads take no signals: they stay with
         * the program's threads */
        err = fastrnn_thread_start(fastrnn_worker_main, NULL);
        if (err != 0) {
            /* EAGAIN (a thread limit) may pass: try again on a later call */
            if (err != EAGAIN && fastrnn_worker.started == 0)
                fastrnn_store_int(&fastrnn_worker.failed, 1);
            break;
        }
        fastrnn_worker.started++;
    }
    if (fastrnn_worker.started == 0) {
        fastrnn_store_release_ll(&fastrnn_worker.claimed, 0);
        return 0;
    }
    return fastrnn_worker.started < workers ? fastrnn_worker.started : workers;
}

static void fastrnn_release(void) {
    fastrnn_store_release_ll(&fastrnn_worker.claimed, 0);
}

/* With the pool claimed: post a job of `nparts` parts; returns its id. A
 * team job's part 0 is the caller's: only parts 1... are offered. */
static long long fastrnn_post(fastrnn_job_fn fn, void* arg, int nparts, int team) {
    long long job;
    int slot;
    fastrnn_worker.fn = fn;
    fastrnn_worker.arg = arg;
    fastrnn_worker.nparts = nparts;
    fastrnn_worker.team = team;
    fastrnn_store_int(&fastrnn_worker.go, 0);
    fastrnn_store_release_ll(&fastrnn_worker.remaining, nparts);
    fastrnn_store_int(&fastrnn_worker.caller_cpu, fastrnn_current_cpu());
    fastrnn_mutex_lock(&fastrnn_worker.mutex);
    job = fastrnn_worker.posted + 1;
    fastrnn_store_release_ll(&fastrnn_worker.ticket,
                             (job << (2 * FASTRNN_PART_BITS))
                             | ((long long)nparts << FASTRNN_PART_BITS) | (team ? 1 : 0));
    fastrnn_store_release_ll(&fastrnn_worker.posted, job);
    if (fastrnn_worker.sleeping) {
        /* (a sleeper cannot leave cond_wait before the mutex is free) */
        for (slot = 0; slot < fastrnn_worker.registered; slot++)
            if (fastrnn_worker.asleep[slot]
                    && fastrnn_steer_off(&fastrnn_worker.steer[slot], fastrnn_worker.caller_cpu))
                fastrnn_worker.steered++;
        fastrnn_cond_broadcast(&fastrnn_worker.cond);
    }
    fastrnn_mutex_unlock(&fastrnn_worker.mutex);
    return job;
}

/* A caller's check while it waits for the workers' parts (run_parts':
 * the signal handlers, so that a Ctrl-C is answered although the caller's
 * own parts are done; the workers' parts see the stop it sets at their next
 * step), or NULL. */
typedef void (*fastrnn_poll_fn)(void* ctx);

static void fastrnn_wait_finished(fastrnn_poll_fn poll, void* ctx) {
    long long spins = 0;
    while (fastrnn_load_acquire_ll(&fastrnn_worker.remaining) != 0) {
        fastrnn_wait_spin(&spins);
        if (poll != NULL)
            poll(ctx);
    }
}

/* Parts that do not wait for each other: fn(arg, p) for p < nparts, on
 * this thread and up to `workers` workers, whoever takes each first;
 * poll(ctx) (or NULL) while this thread waits for the workers' parts. */
static void fastrnn_run_parts(fastrnn_job_fn fn, void* arg, int nparts, int workers,
                              fastrnn_poll_fn poll, void* ctx) {
    long long job;
    int p;
    if (nparts > FASTRNN_MAX_THREADS)
        nparts = FASTRNN_MAX_THREADS;   /* callers pass at most 64 */
    if (nparts < 2 || fastrnn_pool_claim(workers < nparts - 1 ? workers : nparts - 1) == 0) {
        for (p = 0; p < nparts; p++)
            fn(arg, p);
        return;
    }
    job = fastrnn_post(fn, arg, nparts, 0);
    fastrnn_run_taken(job, 0);
    fastrnn_wait_finished(poll, ctx);
    fastrnn_release();
}

/* Parts that meet at barriers: all nparts run at once, the caller one of
 * them. Returns 0 (having run nothing) when the pool is owned by another
 * caller, has too few workers, or they do not take their parts within
 * wait_ns; else 1 when every part is done, *started then the time they
 * started (the workers' wake-up behind them). */
static int fastrnn_run_team(fastrnn_job_fn fn, void* arg, int nparts, long long wait_ns,
                            long long* started) {
    long long job, spins = 0, deadline;
    int part, workers;
    if (nparts < 2 || nparts > FASTRNN_MAX_THREADS)
        return 0;
    workers = fastrnn_pool_claim(nparts - 1);
    if (workers < nparts - 1) {
        if (workers > 0)        /* ours, but too few threads could start */
            fastrnn_release();
        return 0;
    }
    job = fastrnn_post(fn, arg, nparts, 1);
    part = 0;                              /* the caller's own part */
    deadline = fastrnn_clock_ns() + wait_ns;
    while ((fastrnn_load_acquire_ll(&fastrnn_worker.ticket) & FASTRNN_PART_MASK) < nparts) {
        fastrnn_wait_spin(&spins);
        if (fastrnn_clock_ns() > deadline) {
            /* withdraw: take the parts left, so that no late worker starts */
            while (fastrnn_take(job) >= 0)
                fastrnn_add_fetch_ll(&fastrnn_worker.remaining, -1);
            break;
        }
    }
    if (fastrnn_load_acquire_ll(&fastrnn_worker.remaining) < nparts) {
        /* some parts were withdrawn: the others run nothing */
        fastrnn_store_release_int(&fastrnn_worker.go, -1);
        fastrnn_add_fetch_ll(&fastrnn_worker.remaining, -1);   /* ours */
        fastrnn_wait_finished(NULL, NULL);
        fastrnn_worker.withdrawn++;
        fastrnn_release();
        return 0;
    }
    *started = fastrnn_clock_ns();
    fastrnn_store_release_int(&fastrnn_worker.go, 1);
    fastrnn_worker.by_caller++;
    fn(arg, part);
    fastrnn_add_fetch_ll(&fastrnn_worker.remaining, -1);
    fastrnn_wait_finished(NULL, NULL);   /* (its parts met at every barrier) */
    fastrnn_release();
    return 1;
}

#endif
