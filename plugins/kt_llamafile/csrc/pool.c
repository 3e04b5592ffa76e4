/* A small pthread pool: `threads - 1` workers plus the calling thread share the items of one job
 * through an atomic counter. Workers spin on the job generation for a while (ktl_set_spin_us:
 * 50 us by default, longer once jobs run from CUDA graphs, whose GPU work between two layers
 * outlasts a short spin), then sleep on a condition variable, so an idle pool costs no CPU.
 * Jobs are serialised per pool.
 *
 * An external pool (ktl_pool_create_external) has no workers: ktl_pool_run hands the items to
 * another library's parallel-for (kt-amx's shared pool), which blocks until they are done.
 *
 * Either kind has a dispatcher thread for asynchronous work (ktl_pool_post, started on first
 * use): it takes posted tasks in order and runs each as an ordinary caller of ktl_pool_run, so
 * the thread that posts (a CUDA host-function thread) returns at once, and a blocking external
 * parallel-for is called from the dispatcher, never from the poster. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ktl_internal.h"

#define SPIN_ROUNDS 4000
/* How long idle workers spin before they sleep (all pools of the process). */
static _Atomic long long g_spin_ns = 50000;

void ktl_set_spin_us(int us) { atomic_store(&g_spin_ns, (long long)(us < 0 ? 0 : us) * 1000); }

int ktl_spin_us(void) { return (int)(atomic_load(&g_spin_ns) / 1000); }

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

struct ktl_pool {
    int n;
    int n_started;
    pthread_t *threads;
    pthread_mutex_t run_lock; /* one job at a time */
    pthread_mutex_t mu;
    pthread_cond_t cv_start, cv_done;
    int stop;
    ktl_task_fn fn;
    void *ctx;
    int64_t n_items;
    ktl_parallel_for_fn ext_for; /* external pool: its parallel-for (no workers of ours) */
    /* each on its own cache line: the spinning workers read gen, every worker takes items from
     * next and counts itself out in pending; the job's fields above are only read meanwhile */
    _Alignas(64) atomic_uint gen;
    _Alignas(64) atomic_int pending;
    _Alignas(64) atomic_llong next;
    /* dispatcher of posted async tasks (FIFO through ktl_async.next) */
    _Alignas(64) pthread_mutex_t q_mu;
    pthread_cond_t q_work, q_done;
    ktl_async *q_head, *q_tail;
    atomic_int q_len;
    int q_stop, q_started;
    pthread_t q_thread;
};

typedef struct {
    ktl_pool *pool;
    int id;
    int cpu; /* -1: not pinned */
} worker_arg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void run_items(ktl_pool *p, int worker) {
    for (;;) {
        int64_t i = atomic_fetch_add(&p->next, 1);
        if (i >= p->n_items) break;
        p->fn(p->ctx, i, worker);
    }
}

static void *worker_main(void *raw) {
    worker_arg arg = *(worker_arg *)raw;
    free(raw);
    ktl_pool *p = arg.pool;
    if (arg.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(arg.cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    }
    unsigned seen = 0; /* the generation at creation: a job may start before we run */
    for (;;) {
        /* A worker that sees the new generation while spinning runs the job at once: the mutex
         * is only for going to sleep (13 woken workers queueing on it cost ~15 us a run on the
         * 16-core host). */
        unsigned gen = seen;
        const long long limit = atomic_load_explicit(&g_spin_ns, memory_order_relaxed), t0 = now_ns();
        for (unsigned spins = 1;; spins++) {
            gen = atomic_load_explicit(&p->gen, memory_order_acquire);
            if (gen != seen) break;
            cpu_relax();
            if (spins % 64 == 0 && now_ns() - t0 >= limit) break;
        }
        if (gen == seen) {
            pthread_mutex_lock(&p->mu);
            while ((gen = atomic_load(&p->gen)) == seen && !p->stop) pthread_cond_wait(&p->cv_start, &p->mu);
            int stop = p->stop;
            pthread_mutex_unlock(&p->mu);
            if (stop) break;
        }
        seen = gen;
        run_items(p, arg.id);
        if (atomic_fetch_sub(&p->pending, 1) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

static int allowed_cpus(int *cpus, int max) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 0;
    int n = 0;
    for (int c = 0; c < CPU_SETSIZE && n < max; c++)
        if (CPU_ISSET(c, &set)) cpus[n++] = c;
    return n;
}

static ktl_pool *pool_alloc(int threads) {
    if (threads < 1) threads = 1;
    if (threads > 1024) threads = 1024;
    size_t size = (sizeof(ktl_pool) + 63) & ~(size_t)63; /* 64-byte aligned members */
    ktl_pool *p = aligned_alloc(64, size);
    if (!p) return NULL;
    memset(p, 0, size);
    p->n = threads;
    pthread_mutex_init(&p->run_lock, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_start, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    atomic_init(&p->gen, 0);
    atomic_init(&p->pending, 0);
    atomic_init(&p->next, 0);
    pthread_mutex_init(&p->q_mu, NULL);
    pthread_cond_init(&p->q_work, NULL);
    pthread_cond_init(&p->q_done, NULL);
    atomic_init(&p->q_len, 0);
    return p;
}

ktl_pool *ktl_pool_create_external(ktl_parallel_for_fn parallel_for, int threads) {
    if (!parallel_for) return NULL;
    ktl_pool *p = pool_alloc(threads);
    if (p) p->ext_for = parallel_for;
    return p;
}

int ktl_pool_is_external(const ktl_pool *p) { return p && p->ext_for ? 1 : 0; }

ktl_pool *ktl_pool_create(int threads, int pin) {
    ktl_pool *p = pool_alloc(threads);
    if (!p) return NULL;
    threads = p->n;
    if (threads == 1) return p;
    p->threads = calloc((size_t)threads - 1, sizeof(pthread_t));
    int cpus[1024];
    int ncpu = pin ? allowed_cpus(cpus, 1024) : 0;
    if (!p->threads) {
        p->n = 1;
        return p;
    }
    for (int w = 1; w < threads; w++) {
        worker_arg *arg = malloc(sizeof *arg);
        if (!arg) break;
        arg->pool = p;
        arg->id = w;
        arg->cpu = ncpu > 0 ? cpus[w % ncpu] : -1;
        if (pthread_create(&p->threads[w - 1], NULL, worker_main, arg) != 0) {
            free(arg);
            break;
        }
        p->n_started++;
    }
    p->n = p->n_started + 1;
    return p;
}

static void dispatcher_stop(ktl_pool *p);

void ktl_pool_destroy(ktl_pool *p) {
    if (!p) return;
    dispatcher_stop(p);
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv_start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_started; i++) pthread_join(p->threads[i], NULL);
    free(p->threads);
    pthread_mutex_destroy(&p->run_lock);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_start);
    pthread_cond_destroy(&p->cv_done);
    pthread_mutex_destroy(&p->q_mu);
    pthread_cond_destroy(&p->q_work);
    pthread_cond_destroy(&p->q_done);
    free(p);
}

int ktl_pool_threads(const ktl_pool *p) { return p ? p->n : 1; }

static void run_serial(ktl_task_fn fn, void *ctx, int64_t n_items) {
    for (int64_t i = 0; i < n_items; i++) fn(ctx, i, 0);
}

void ktl_pool_run(ktl_pool *p, ktl_task_fn fn, void *ctx, int64_t n_items) {
    if (n_items <= 0) return;
    if (!p || p->n == 1 || n_items == 1) {
        run_serial(fn, ctx, n_items);
        return;
    }
    if (p->ext_for) {
        pthread_mutex_lock(&p->run_lock);
        if (p->ext_for(fn, ctx, n_items) != 0) run_serial(fn, ctx, n_items); /* not started */
        pthread_mutex_unlock(&p->run_lock);
        return;
    }
    pthread_mutex_lock(&p->run_lock);
    p->fn = fn;
    p->ctx = ctx;
    p->n_items = n_items;
    atomic_store(&p->next, 0);
    atomic_store(&p->pending, p->n - 1);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv_start);
    pthread_mutex_unlock(&p->mu);
    run_items(p, 0);
    int spins = 0;
    while (atomic_load_explicit(&p->pending, memory_order_acquire) > 0 && spins < SPIN_ROUNDS * 4) {
        cpu_relax();
        spins++;
    }
    pthread_mutex_lock(&p->mu);
    while (atomic_load(&p->pending) > 0) pthread_cond_wait(&p->cv_done, &p->mu);
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&p->run_lock);
}

/* ------------------------------------------------------------------ async dispatcher */

static void *dispatcher_main(void *raw) {
    ktl_pool *p = raw;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&p->q_len, memory_order_acquire) == 0 && spins < SPIN_ROUNDS) {
            cpu_relax();
            spins++;
        }
        pthread_mutex_lock(&p->q_mu);
        while (!p->q_head && !p->q_stop) pthread_cond_wait(&p->q_work, &p->q_mu);
        ktl_async *task = p->q_head;
        if (!task) { /* stop requested and the queue is drained */
            pthread_mutex_unlock(&p->q_mu);
            break;
        }
        p->q_head = task->next;
        if (!p->q_head) p->q_tail = NULL;
        atomic_fetch_sub(&p->q_len, 1);
        pthread_mutex_unlock(&p->q_mu);

        task->run(task);

        pthread_mutex_lock(&p->q_mu);
        atomic_store_explicit(&task->done, 1, memory_order_release);
        pthread_cond_broadcast(&p->q_done);
        pthread_mutex_unlock(&p->q_mu);
    }
    return NULL;
}

int ktl_pool_post(ktl_pool *p, ktl_async *task) {
    pthread_mutex_lock(&p->q_mu);
    if (!p->q_started) {
        if (pthread_create(&p->q_thread, NULL, dispatcher_main, p) != 0) {
            pthread_mutex_unlock(&p->q_mu);
            return KTL_ERR_NOMEM;
        }
        p->q_started = 1;
    }
    atomic_store_explicit(&task->done, 0, memory_order_relaxed);
    task->next = NULL;
    if (p->q_tail) p->q_tail->next = task;
    else p->q_head = task;
    p->q_tail = task;
    atomic_fetch_add_explicit(&p->q_len, 1, memory_order_release);
    pthread_cond_signal(&p->q_work);
    pthread_mutex_unlock(&p->q_mu);
    return 0;
}

void ktl_pool_await(ktl_pool *p, ktl_async *task) {
    int spins = 0;
    while (!atomic_load_explicit(&task->done, memory_order_acquire) && spins < SPIN_ROUNDS * 4) {
        cpu_relax();
        spins++;
    }
    if (atomic_load_explicit(&task->done, memory_order_acquire)) return;
    pthread_mutex_lock(&p->q_mu);
    while (!atomic_load(&task->done)) pthread_cond_wait(&p->q_done, &p->q_mu);
    pthread_mutex_unlock(&p->q_mu);
}

/* Runs what is queued, then ends the dispatcher (ktl_pool_destroy). */
static void dispatcher_stop(ktl_pool *p) {
    pthread_mutex_lock(&p->q_mu);
    int started = p->q_started;
    p->q_stop = 1;
    pthread_cond_broadcast(&p->q_work);
    pthread_mutex_unlock(&p->q_mu);
    if (started) pthread_join(p->q_thread, NULL);
}
