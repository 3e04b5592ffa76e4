/* Asynchronous experts jobs (the job protocol of ktcore's HostExpertsRunner, DESIGN section 5).
 *
 * A job is bound once to fixed buffers (static pinned tensors in a CUDA graph) and owns the
 * experts workspace for its t tokens x topk (experts.c: routing, quantised x and h, fp32
 * staging of bf16 x / y), so a run allocates nothing. A run (on the pool's dispatcher thread,
 * see pool.c) is ktl_experts_run on the bound buffers: bf16 x is read and int64 ids narrowed
 * by the run itself, y written in its dtype (bf16: round to nearest even, as torch's
 * .to(torch.bfloat16), so a job's y is bit-identical to the synchronous forward's); with
 * t * topk <= 64 that is one pool run.
 *
 * submit posts the job and returns; wait blocks until it is done and returns the run's status.
 * ktl_host_submit / ktl_host_wait are the same two as void (*)(void *) for cudaLaunchHostFunc.
 * ktl_host_run runs the job on the calling thread (with the pool) and ktl_host_done returns at
 * once: the pair for a doorbell's watcher, which would otherwise only wait for the dispatcher. */
#include <stdlib.h>

#include "ktl_internal.h"

struct ktl_job {
    ktl_async async; /* first member: the dispatcher hands us back this pointer */
    ktl_pool *pool;
    ktl_experts_desc desc;
    int64_t t, topk;
    ktl_experts_io io;
    ktl_experts_ws *ws; /* NULL when the layer is invalid: runs report desc_rc */
    int desc_rc;
    int submitted;
    _Atomic int status;
};

enum { DT_F32 = 0, DT_BF16 = 1 };

static void job_run(ktl_async *task) {
    ktl_job *j = (ktl_job *)task;
    int rc = j->desc_rc ? j->desc_rc : ktl_experts_run(j->pool, &j->desc, j->ws, j->t, j->topk, &j->io);
    atomic_store_explicit(&j->status, rc, memory_order_relaxed);
}

ktl_job *ktl_job_create(ktl_pool *pool, const ktl_experts_desc *desc, int64_t t, int64_t topk,
                        const void *x, int x_dtype, const void *ids, int ids_int64,
                        const float *weights, void *y, int y_dtype) {
    if (!pool || !desc || t <= 0 || topk < 0 || !x || !y || (topk > 0 && (!ids || !weights))) return NULL;
    if ((x_dtype != DT_F32 && x_dtype != DT_BF16) || (y_dtype != DT_F32 && y_dtype != DT_BF16)) return NULL;
    ktl_job *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    j->async.run = job_run;
    atomic_init(&j->async.done, 1);
    atomic_init(&j->status, KTL_ERR_NOT_SUBMITTED);
    j->pool = pool;
    j->desc = *desc;
    j->t = t;
    j->topk = topk;
    j->io = (ktl_experts_io){x, x_dtype == DT_BF16, ids, ids_int64 != 0, weights, y, y_dtype == DT_BF16};
    j->desc_rc = ktl_experts_check(desc);
    if (j->desc_rc == 0 && !(j->ws = ktl_experts_ws_create(desc, t, topk, j->io.x_bf16, j->io.y_bf16))) {
        free(j);
        return NULL;
    }
    return j;
}

void ktl_job_destroy(ktl_job *j) {
    if (!j) return;
    if (j->submitted) ktl_pool_await(j->pool, &j->async);
    ktl_experts_ws_destroy(j->ws);
    free(j);
}

int ktl_job_submit(ktl_job *j) {
    if (!j) return KTL_ERR_ARG;
    if (j->submitted) ktl_pool_await(j->pool, &j->async); /* the previous run first */
    int rc = ktl_pool_post(j->pool, &j->async); /* on failure `done` stays 1: wait reports rc */
    if (rc != 0) atomic_store(&j->status, rc);
    j->submitted = 1;
    return rc;
}

int ktl_job_wait(ktl_job *j) {
    if (!j) return KTL_ERR_ARG;
    if (!j->submitted) return KTL_ERR_NOT_SUBMITTED;
    ktl_pool_await(j->pool, &j->async);
    return atomic_load(&j->status);
}

int ktl_job_run(ktl_job *j) {
    if (!j) return KTL_ERR_ARG;
    if (j->submitted) ktl_pool_await(j->pool, &j->async); /* a run posted before */
    job_run(&j->async);
    j->submitted = 1; /* `done` is still 1: wait returns this run's status */
    return atomic_load(&j->status);
}

void ktl_host_submit(void *job) { (void)ktl_job_submit(job); }

void ktl_host_run(void *job) { (void)ktl_job_run(job); }

void ktl_host_done(void *job) { (void)job; }

void ktl_host_wait(void *job) { (void)ktl_job_wait(job); }
