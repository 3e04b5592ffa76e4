/* Asynchronous experts jobs (the job protocol of ktcore's HostExpertsRunner, DESIGN section 5).
 *
 * A job is bound once to fixed buffers (static pinned tensors in a CUDA graph) and owns the
 * fp32 / int32 staging it needs: x32 [t, hidden] when x is bf16, y32 [t, hidden] when y is
 * bf16, ids32 [t * topk] when ids are int64. A run (on the pool's dispatcher thread, see
 * pool.c) converts the inputs in parallel, runs ktl_experts on the pool and converts y back
 * (bf16: round to nearest even, as torch's .to(torch.bfloat16), so a job's y is bit-identical
 * to the synchronous forward's).
 *
 * submit posts the job and returns; wait blocks until it is done and returns the run's status.
 * ktl_host_submit / ktl_host_wait are the same two as void (*)(void *) for cudaLaunchHostFunc. */
#include <stdlib.h>
#include <string.h>

#include "ktl_internal.h"

struct ktl_job {
    ktl_async async; /* first member: the dispatcher hands us back this pointer */
    ktl_pool *pool;
    ktl_experts_desc desc;
    int64_t t, topk;
    const void *x;
    int x_dtype, y_dtype, ids_int64;
    const void *ids;
    const float *weights;
    void *y;
    float *x32, *y32; /* staging for bf16 x / y, else NULL */
    int32_t *ids32;   /* staging for int64 ids, else NULL */
    int submitted;
    _Atomic int status;
};

enum { DT_F32 = 0, DT_BF16 = 1 };
#define ROWS_PER_ITEM 8

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN: torch's quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

typedef struct {
    ktl_job *job;
    int to_bf16; /* 0: x bf16 -> x32, 1: y32 -> y bf16 */
} convert_ctx;

static void convert_rows(void *raw, int64_t item, int worker) {
    (void)worker;
    const convert_ctx *c = raw;
    const ktl_job *j = c->job;
    int64_t h = j->desc.hidden;
    int64_t r0 = item * ROWS_PER_ITEM, r1 = r0 + ROWS_PER_ITEM;
    if (r1 > j->t) r1 = j->t;
    if (c->to_bf16) {
        uint16_t *dst = j->y;
        for (int64_t i = r0 * h; i < r1 * h; i++) dst[i] = f32_to_bf16(j->y32[i]);
    } else {
        const uint16_t *src = j->x;
        for (int64_t i = r0 * h; i < r1 * h; i++) j->x32[i] = bf16_to_f32(src[i]);
    }
}

static void convert(ktl_job *j, int to_bf16) {
    convert_ctx c = {j, to_bf16};
    ktl_pool_run(j->pool, convert_rows, &c, (j->t + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM);
}

static int narrow_ids(ktl_job *j) {
    const int64_t *src = j->ids;
    int64_t n = j->t * j->topk, e = j->desc.num_experts;
    for (int64_t i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] > e) return KTL_ERR_IDS;
        j->ids32[i] = (int32_t)src[i];
    }
    return 0;
}

static void job_run(ktl_async *task) {
    ktl_job *j = (ktl_job *)task;
    int rc = 0;
    if (j->ids32) rc = narrow_ids(j);
    if (rc == 0) {
        if (j->x32) convert(j, 0);
        const float *x = j->x32 ? j->x32 : j->x;
        const int32_t *ids = j->ids32 ? j->ids32 : j->ids;
        float *y = j->y32 ? j->y32 : j->y;
        rc = ktl_experts(j->pool, &j->desc, x, j->t, ids, j->topk, j->weights, y);
        if (rc == 0 && j->y32) convert(j, 1);
    }
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
    j->x = x;
    j->x_dtype = x_dtype;
    j->ids = ids;
    j->ids_int64 = ids_int64;
    j->weights = weights;
    j->y = y;
    j->y_dtype = y_dtype;
    size_t act = (size_t)(t * desc->hidden) * sizeof(float);
    int fail = 0;
    if (x_dtype == DT_BF16) fail |= !(j->x32 = malloc(act ? act : 1));
    if (y_dtype == DT_BF16) fail |= !(j->y32 = malloc(act ? act : 1));
    if (ids_int64 && topk > 0) fail |= !(j->ids32 = malloc((size_t)(t * topk) * sizeof(int32_t)));
    if (fail) {
        ktl_job_destroy(j);
        return NULL;
    }
    return j;
}

void ktl_job_destroy(ktl_job *j) {
    if (!j) return;
    if (j->submitted) ktl_pool_await(j->pool, &j->async);
    free(j->x32);
    free(j->y32);
    free(j->ids32);
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

void ktl_host_submit(void *job) { (void)ktl_job_submit(job); }

void ktl_host_wait(void *job) { (void)ktl_job_wait(job); }
