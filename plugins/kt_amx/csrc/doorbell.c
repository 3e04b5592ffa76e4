/* Doorbells: host jobs rung from a CUDA stream through mapped memory, with no host node.
 *
 * A doorbell is two int32 words in page-locked, device-mapped host memory. A CUDA stream
 * rings it with a memory operation (cuStreamWriteValue32 of an entry's code into `req`) and
 * then waits, with another one (cuStreamWaitValue32), until `done` holds the same code. A
 * watcher thread spins on `req`; when a code arrives it clears `req`, runs the entry's
 * submit and wait functions (the job protocol's void (*)(void *) pair, e.g. kt_host_submit
 * and kt_host_wait) and stores the code into `done`. The stream then resets `done` to 0
 * itself. That replaces the two CUDA host nodes of a CPU-experts layer, each a round trip
 * through the driver's callback thread (tens of microseconds per node on the GPU host).
 *
 * One doorbell serves one stream: its requests come one at a time, in stream order. The
 * watcher spins for `spin_us` after the last request, then polls with short sleeps, and
 * with 1 ms sleeps after a second of silence, so an idle model costs no core. A code that
 * names no entry (or a removed one) is answered at once, so the stream never hangs on it;
 * `kt_doorbell_count` reports such codes.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "kt_internal.h"

typedef void (*kt_host_fn)(void *);

typedef struct {
    kt_host_fn submit, wait;
    void *job;
} kt_bell_entry;

struct kt_doorbell {
    _Atomic int32_t *req;   /* mapped: the stream writes an entry's code (index + 1) */
    _Atomic int32_t *done;  /* mapped: the watcher writes the code once its job finished */
    kt_bell_entry *entries;
    int32_t cap;
    _Atomic int32_t n;
    pthread_mutex_t mu;     /* start / stop / add */
    pthread_t thread;
    int running;
    _Atomic int stop;
    int cpu;
    int64_t spin_ns;
    _Atomic int64_t answered, unknown;
    /* time sums (ns) of answered requests: in submit, in wait, and since the previous answer
     * when that was less than KT_BELL_GAP_NS ago (the stream's own work between two layers) */
    _Atomic int64_t submit_ns, wait_ns, gap_ns, gaps;
    int64_t last_done;
};

#define KT_BELL_GAP_NS 5000000

static void bell_sleep_ns(int64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    nanosleep(&ts, NULL);
}

static void ring(kt_doorbell *d, int32_t code, int64_t t_req) {
    const int32_t n = atomic_load_explicit(&d->n, memory_order_acquire);
    kt_bell_entry e = {0};
    if (code > 0 && code <= n) e = d->entries[code - 1];
    if (e.submit && e.wait) {
        e.submit(e.job);
        const int64_t t_sub = kt_now_ns();
        e.wait(e.job);
        const int64_t t_done = kt_now_ns();
        atomic_fetch_add_explicit(&d->submit_ns, t_sub - t_req, memory_order_relaxed);
        atomic_fetch_add_explicit(&d->wait_ns, t_done - t_sub, memory_order_relaxed);
        if (t_req - d->last_done < KT_BELL_GAP_NS) {
            atomic_fetch_add_explicit(&d->gap_ns, t_req - d->last_done, memory_order_relaxed);
            atomic_fetch_add_explicit(&d->gaps, 1, memory_order_relaxed);
        }
        d->last_done = t_done;
        atomic_fetch_add_explicit(&d->answered, 1, memory_order_relaxed);
    } else {
        atomic_fetch_add_explicit(&d->unknown, 1, memory_order_relaxed);
    }
    /* x86 stores are ordered: the job's y is visible before `done` */
    atomic_store_explicit(d->done, code, memory_order_release);
}

static void *watch(void *arg) {
    kt_doorbell *d = arg;
    kt_pin_thread(d->cpu);
    int64_t last = kt_now_ns();
    unsigned spins = 0;
    while (!atomic_load_explicit(&d->stop, memory_order_relaxed)) {
        const int32_t code = atomic_load_explicit(d->req, memory_order_acquire);
        if (code != 0) {
            atomic_store_explicit(d->req, 0, memory_order_relaxed);
            ring(d, code, kt_now_ns());
            last = kt_now_ns();
            spins = 0;
            continue;
        }
        _mm_pause();
        if (++spins % 256 == 0) {
            const int64_t idle = kt_now_ns() - last;
            if (idle > 1000000000) bell_sleep_ns(1000000);
            else if (idle > d->spin_ns) bell_sleep_ns(20000);
        }
    }
    return NULL;
}

kt_doorbell *kt_doorbell_create(int32_t *req, int32_t *done, int32_t capacity) {
    if (!req || !done || capacity < 1) return NULL;
    kt_doorbell *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->entries = calloc((size_t)capacity, sizeof *d->entries);
    if (!d->entries) {
        free(d);
        return NULL;
    }
    d->req = (_Atomic int32_t *)req;
    d->done = (_Atomic int32_t *)done;
    d->cap = capacity;
    d->cpu = -1;
    pthread_mutex_init(&d->mu, NULL);
    return d;
}

int32_t kt_doorbell_add(kt_doorbell *d, void *submit, void *wait, void *job) {
    if (!d || !submit || !wait) return -1;
    pthread_mutex_lock(&d->mu);
    const int32_t i = atomic_load(&d->n);
    int32_t code = -1;
    if (i < d->cap) {
        d->entries[i] = (kt_bell_entry){(kt_host_fn)submit, (kt_host_fn)wait, job};
        atomic_store_explicit(&d->n, i + 1, memory_order_release);
        code = i + 1;
    }
    pthread_mutex_unlock(&d->mu);
    return code;
}

void kt_doorbell_remove(kt_doorbell *d, int32_t code) {
    if (!d || code < 1 || code > atomic_load(&d->n)) return;
    pthread_mutex_lock(&d->mu);
    d->entries[code - 1] = (kt_bell_entry){0};  /* only while no stream can ring it */
    pthread_mutex_unlock(&d->mu);
}

int kt_doorbell_start(kt_doorbell *d, int cpu, int spin_us) {
    if (!d) return -1;
    pthread_mutex_lock(&d->mu);
    int rc = 0;
    if (!d->running) {
        d->cpu = cpu;
        d->spin_ns = (int64_t)(spin_us < 0 ? 0 : spin_us) * 1000;
        atomic_store(&d->stop, 0);
        rc = pthread_create(&d->thread, NULL, watch, d);
        d->running = rc == 0;
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

void kt_doorbell_stop(kt_doorbell *d) {
    if (!d) return;
    pthread_mutex_lock(&d->mu);
    if (d->running) {
        atomic_store(&d->stop, 1);
        pthread_join(d->thread, NULL);
        d->running = 0;
    }
    pthread_mutex_unlock(&d->mu);
}

int kt_doorbell_running(kt_doorbell *d) {
    if (!d) return 0;
    pthread_mutex_lock(&d->mu);
    const int running = d->running;
    pthread_mutex_unlock(&d->mu);
    return running;
}

int64_t kt_doorbell_count(kt_doorbell *d, int32_t unknown) {
    if (!d) return 0;
    return atomic_load(unknown ? &d->unknown : &d->answered);
}

void kt_doorbell_times(kt_doorbell *d, int64_t *out) {
    if (!d || !out) return;
    out[0] = atomic_load(&d->submit_ns);
    out[1] = atomic_load(&d->wait_ns);
    out[2] = atomic_load(&d->gap_ns);
    out[3] = atomic_load(&d->gaps);
}

void kt_doorbell_destroy(kt_doorbell *d) {
    if (!d) return;
    kt_doorbell_stop(d);
    pthread_mutex_destroy(&d->mu);
    free(d->entries);
    free(d);
}
