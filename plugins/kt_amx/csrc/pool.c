/* The process-wide pool of persistent worker threads.
 *
 * Workers wait for a new job generation by spinning for a short while (kt_pool_set_spin_us)
 * and then sleeping on a condition variable (a futex on Linux). A job is a fixed list of
 * phases; all its participants run every phase, taking items from the phase's atomic
 * counter, and meet at a barrier between phases. The last participant to finish marks the
 * job done and wakes a sleeping waiter. One job runs at a time; a submit first waits for the
 * job before it. Workers can be pinned to one physical core each (or to the CPUs the NUMA
 * placement of kt_amx/numa.py chose: kt_pool_start_cpus).
 *
 * A job may involve only some workers (wmap / nw), but every worker checks in for every job
 * before it is marked done, so no worker can read a job after its owner freed it. A layer of
 * NUMA parts runs its parts' sub-jobs first, each on the workers of its node. Parallel-for
 * jobs (kt_pool_parallel_for, the shared pool API for other plugins) are plain jobs of one
 * phase, so they queue behind a running layer job like any other.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kt_job.h"

typedef struct kt_pool kt_pool;

typedef struct {
    kt_pool *pool;
    int id;
    int cpu;  /* -1: not pinned */
} kt_worker;

struct kt_pool {
    int n;
    pthread_t *threads;
    kt_worker *workers;
    pthread_mutex_t mu;        /* guards sleeping and waking */
    pthread_cond_t cv_work;
    pthread_cond_t cv_done;
    pthread_mutex_t submit_mu; /* one submitter at a time */
    _Atomic uint32_t gen;
    kt_job *_Atomic job;
    kt_job *current;           /* last submitted job (under submit_mu) */
    _Atomic int sleepers;
    _Atomic int waiters;
};

static kt_pool *g_pool;
static pthread_mutex_t g_pool_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int g_spin_us = 50;

int64_t kt_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void kt_pin_thread(int cpu) {
#if defined(__linux__)
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    }
#else
    (void)cpu;
#endif
}

void kt_pool_set_spin_us(int us) { atomic_store(&g_spin_us, us < 0 ? 0 : us); }

/* ------------------------------------------------------------------ topology & pinning */

static int read_int_file(const char *path, int *out) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    const int ok = fscanf(f, "%d", out) == 1;
    fclose(f);
    return ok;
}

/* One logical CPU per physical core among the CPUs this process may run on. */
static int physical_core_cpus(int *cpus, int max) {
    int n = 0;
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 0;
    int seen_pkg[1024], seen_core[1024], nseen = 0;
    for (int c = 0; c < CPU_SETSIZE && n < max && nseen < 1024; c++) {
        if (!CPU_ISSET(c, &set)) continue;
        char path[128];
        int core = c, pkg = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/core_id", c);
        read_int_file(path, &core);
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", c);
        read_int_file(path, &pkg);
        int dup = 0;
        for (int i = 0; i < nseen; i++) dup |= seen_pkg[i] == pkg && seen_core[i] == core;
        if (dup) continue;
        seen_pkg[nseen] = pkg, seen_core[nseen] = core, nseen++;
        cpus[n++] = c;
    }
#else
    (void)cpus;
    (void)max;
#endif
    return n;
}

int kt_physical_cores(void) {
    int cpus[1024];
    const int n = physical_core_cpus(cpus, 1024);
    return n > 0 ? n : (int)sysconf(_SC_NPROCESSORS_ONLN);
}

/* -------------------------------------------------------------------------- the job */

static void job_barrier(kt_job *job) {
    const int32_t gen = atomic_load_explicit(&job->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&job->bar_count, 1, memory_order_acq_rel) == job->nw - 1) {
        atomic_store_explicit(&job->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&job->bar_gen, 1, memory_order_release);
        return;
    }
    unsigned spins = 0;
    while (atomic_load_explicit(&job->bar_gen, memory_order_acquire) == gen) {
        _mm_pause();
        if (++spins % 4096 == 0) sched_yield(); /* an oversubscribed host must not livelock */
    }
}

/* The phases of one job on one participant (`local` is its index in the job). */
static void run_phases(kt_job *job, int local) {
    const int np = job->n_phases > 0 ? job->n_phases : KT_NUM_PHASES;
    for (int p = 0; p < np; p++) {
        const int32_t n = job->n_items[p];
        int32_t i;
        while ((i = atomic_fetch_add_explicit(&job->next[p], 1, memory_order_relaxed)) < n)
            kt_job_item(job, p, i, local);
        if (p + 1 < np) job_barrier(job);
    }
}

static void run_for(kt_job *job, int pool_worker) {
    int64_t i;
    while ((i = atomic_fetch_add_explicit(&job->for_next, 1, memory_order_relaxed)) < job->for_items)
        job->for_fn(job->for_ctx, i, pool_worker);
}

static int job_local(const kt_job *job, int pool_worker) {
    if (job->wmap) return job->wmap[pool_worker];
    return pool_worker < job->nw ? pool_worker : -1;
}

/* Runs a job on pool worker `pool_worker`: first the sub-jobs of the parts this worker serves
 * (in part order, so that a worker serving two parts cannot deadlock their barriers), then,
 * after a barrier of all participants, the job's own phases. Every worker of the pool checks
 * in, taking part or not: a job is done only once no worker will read it again (the waiter
 * may free it), and a worker can never skip a generation and pick up the next job twice. */
static void job_execute(kt_pool *pool, kt_job *job, int pool_worker) {
    const int local = job_local(job, pool_worker);
    if (local >= 0) {
        if (job->kind == KT_JOB_FOR) {
            run_for(job, pool_worker);
        } else {
            for (int s = 0; s < job->n_subs; s++) {
                kt_job *sub = job->subs[s];
                const int l = sub->wmap[pool_worker];
                if (l >= 0) run_phases(sub, l);
            }
            if (job->n_subs > 0) job_barrier(job);
            run_phases(job, local);
        }
        if (job->ops && job->ops->tile_release) job->ops->tile_release();
    }
    if (atomic_fetch_add_explicit(&job->finished, 1, memory_order_acq_rel) == pool->n - 1) {
        atomic_store(&job->done, 1); /* seq_cst: pairs with the waiter's waiters++ / done load */
        if (atomic_load(&pool->waiters) > 0) {
            pthread_mutex_lock(&pool->mu);
            pthread_cond_broadcast(&pool->cv_done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
}

/* Pool worker id of the calling thread, -1 outside the pool. */
static __thread int t_worker = -1;

static void *worker_main(void *arg) {
    kt_worker *w = arg;
    kt_pool *pool = w->pool;
    t_worker = w->id;
    kt_pin_thread(w->cpu);
    uint32_t seen = 0;
    for (;;) {
        uint32_t g = atomic_load_explicit(&pool->gen, memory_order_acquire);
        if (g == seen) {
            const int64_t limit = (int64_t)atomic_load(&g_spin_us) * 1000;
            const int64_t t0 = kt_now_ns();
            unsigned spins = 0;
            while ((g = atomic_load_explicit(&pool->gen, memory_order_acquire)) == seen) {
                _mm_pause();
                if (++spins % 64 == 0 && kt_now_ns() - t0 >= limit) {
                    pthread_mutex_lock(&pool->mu);
                    atomic_fetch_add(&pool->sleepers, 1);
                    while ((g = atomic_load(&pool->gen)) == seen) pthread_cond_wait(&pool->cv_work, &pool->mu);
                    atomic_fetch_sub(&pool->sleepers, 1);
                    pthread_mutex_unlock(&pool->mu);
                    break;
                }
            }
        }
        seen = g;
        kt_job *job = atomic_load_explicit(&pool->job, memory_order_acquire);
        if (!job) break; /* generation bumped with no job: shut down */
        job_execute(pool, job, w->id);
    }
    return NULL;
}

static int pool_start(int n_threads, const int *cpus, int ncpus, int skip_first);

int kt_pool_start(int n_threads, int pin) {
    int cpus[1024];
    const int ncores = pin ? physical_core_cpus(cpus, 1024) : 0;
    /* Leave the first core to the thread that drives the model when there is room. */
    return pool_start(n_threads, cpus, ncores, n_threads < ncores);
}

int kt_pool_start_cpus(int n_threads, const int32_t *cpus) {
    int list[1024];
    int n = 0;
    if (cpus)
        for (; n < n_threads && n < 1024; n++) list[n] = cpus[n];
    return pool_start(n_threads, list, cpus ? n : 0, 0);
}

int kt_pool_worker_cpu(int worker) {
    pthread_mutex_lock(&g_pool_mu);
    const int cpu = g_pool && worker >= 0 && worker < g_pool->n ? g_pool->workers[worker].cpu : -1;
    pthread_mutex_unlock(&g_pool_mu);
    return cpu;
}

/* Worker i runs on cpus[(i + skip_first) % ncpus] (ncpus 0: unpinned). */
static int pool_start(int n_threads, const int *cpus, int ncores, int skip_first) {
    pthread_mutex_lock(&g_pool_mu);
    if (g_pool) {
        const int n = g_pool->n;
        pthread_mutex_unlock(&g_pool_mu);
        return n;
    }
    if (n_threads < 1) n_threads = 1;
    kt_pool *pool = calloc(1, sizeof *pool);
    pool->threads = calloc((size_t)n_threads, sizeof *pool->threads);
    pool->workers = calloc((size_t)n_threads, sizeof *pool->workers);
    pthread_mutex_init(&pool->mu, NULL);
    pthread_mutex_init(&pool->submit_mu, NULL);
    pthread_cond_init(&pool->cv_work, NULL);
    pthread_cond_init(&pool->cv_done, NULL);
    int started = 0;
    for (int i = 0; i < n_threads; i++) {
        kt_worker *w = &pool->workers[i];
        w->pool = pool;
        w->id = i;
        w->cpu = -1;
        if (ncores > 0) w->cpu = cpus[(i + skip_first) % ncores];
        if (pthread_create(&pool->threads[i], NULL, worker_main, w) != 0) break;
        started++;
    }
    pool->n = started;
    g_pool = started > 0 ? pool : NULL;
    pthread_mutex_unlock(&g_pool_mu);
    return started;
}

int kt_pool_size(void) {
    pthread_mutex_lock(&g_pool_mu);
    const int n = g_pool ? g_pool->n : 0;
    pthread_mutex_unlock(&g_pool_mu);
    return n;
}

static void wait_done(kt_pool *pool, kt_job *job) {
    if (atomic_load(&job->done)) return;
    const int64_t limit = (int64_t)atomic_load(&g_spin_us) * 1000;
    const int64_t t0 = kt_now_ns();
    unsigned spins = 0;
    while (!atomic_load_explicit(&job->done, memory_order_acquire)) {
        _mm_pause();
        if (++spins % 64 == 0 && kt_now_ns() - t0 >= limit) {
            pthread_mutex_lock(&pool->mu);
            atomic_fetch_add(&pool->waiters, 1);
            while (!atomic_load(&job->done)) pthread_cond_wait(&pool->cv_done, &pool->mu);
            atomic_fetch_sub(&pool->waiters, 1);
            pthread_mutex_unlock(&pool->mu);
            return;
        }
    }
}

int kt_pool_submit_job(kt_job *job) {
    kt_pool *pool = g_pool;
    if (!pool) return KT_E_NO_POOL;
    pthread_mutex_lock(&pool->submit_mu);
    if (pool->current) wait_done(pool, pool->current);
    int status = kt_job_prepare(job, pool->n);
    if (status != KT_OK) {
        atomic_store(&job->status, status);
        atomic_store(&job->done, 1);
        job->submitted = 1;
        pthread_mutex_unlock(&pool->submit_mu);
        return status;
    }
    kt_job_reset_run(job);
    atomic_store(&job->finished, 0);
    atomic_store(&job->done, 0);
    job->submitted = 1;
    pool->current = job;
    pthread_mutex_lock(&pool->mu);
    atomic_store_explicit(&pool->job, job, memory_order_release);
    atomic_fetch_add_explicit(&pool->gen, 1, memory_order_release);
    if (atomic_load(&pool->sleepers) > 0) pthread_cond_broadcast(&pool->cv_work);
    pthread_mutex_unlock(&pool->mu);
    pthread_mutex_unlock(&pool->submit_mu);
    return KT_OK;
}

int kt_pool_wait_job(kt_job *job) {
    if (!job->submitted) return KT_E_NOT_SET;
    kt_pool *pool = g_pool;
    if (pool) wait_done(pool, job);
    int status = atomic_load(&job->status);
    for (int s = 0; s < job->n_subs; s++) status |= atomic_load(&job->subs[s]->status);
    return status;
}

/* Called before a job is freed: waits for it and drops the pool's reference. */
void kt_pool_forget_job(kt_job *job) {
    kt_pool *pool = g_pool;
    if (!pool) return;
    pthread_mutex_lock(&pool->submit_mu);
    if (job->submitted) wait_done(pool, job);
    if (pool->current == job) pool->current = NULL;
    pthread_mutex_unlock(&pool->submit_mu);
}

/* ------------------------------------------------------------------- parallel for */

int kt_pool_run_for(kt_task_fn fn, void *ctx, int64_t n_items, const int32_t *wmap, int32_t nw) {
    if (!g_pool) return KT_E_NO_POOL;
    if (n_items <= 0) return KT_OK;
    if (t_worker >= 0) { /* nested inside a pool task: the pool is busy with our caller */
        for (int64_t i = 0; i < n_items; i++) fn(ctx, i, t_worker);
        return KT_OK;
    }
    kt_job *job = kt_job_create();
    if (!job) return KT_E_WORKSPACE;
    job->kind = KT_JOB_FOR;
    job->for_fn = fn;
    job->for_ctx = ctx;
    job->for_items = n_items;
    job->wmap = wmap;
    job->nw = nw;
    int status = kt_pool_submit_job(job);
    if (status == KT_OK) status = kt_pool_wait_job(job);
    kt_job_destroy(job);
    return status;
}

int kt_pool_parallel_for(kt_task_fn fn, void *ctx, int64_t n_items) {
    const int n = kt_pool_size();
    if (n <= 0) return KT_E_NO_POOL;
    if (!fn) return -1;
    return kt_pool_run_for(fn, ctx, n_items, NULL, n);
}
