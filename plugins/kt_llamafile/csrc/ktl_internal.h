/* Internal interfaces: activation row layouts, the matmul argument block, the per-ISA kernel
 * table (kernels.c is compiled once per ISA and fills one table each) and the worker pool. */
#ifndef KTL_INTERNAL_H
#define KTL_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>

#include "ktl_api.h"
#include "ktl_types.h"

#define KTL_ALIGN 64
static inline int64_t ktl_align(int64_t n) { return (n + KTL_ALIGN - 1) & ~(int64_t)(KTL_ALIGN - 1); }

/* Quantised activation rows, one per token, `stride` bytes apart (a multiple of 64):
 *   Q8_0-style (for the 32-element types): int8 q[k] | float d[k/32] | int32 s[k/32]
 *       x ~= d * q per block of 32, s = sum of the block's q;
 *   Q8_K-style (for the K types): int8 q[k] | float d[k/256] | int16 bsums[k/16]
 *       x ~= d * q per block of 256, bsums = sums of each 16 q (Q8_KP: q's 32-groups in the
 *       order 0 2 1 3 4 6 5 7 within each block; d and bsums as for Q8_K).
 * q is rounded to nearest (even) and lies in [-127, 127]. F32 rows are the floats as given.
 * (Lane-expanded copies of d and s per block pair were tried for the AVX-512 kernels: the rows
 * grow threefold, fall out of L1 for long rows, and GEMV got slower.) */
typedef struct {
    int64_t stride, d_off, s_off;
} ktl_act_layout;

static inline ktl_act_layout ktl_act_layout_of(int kind, int64_t k) {
    ktl_act_layout l = {k * 4, 0, 0};
    if (kind == KTL_ACT_Q8_0) {
        l.d_off = ktl_align(k);
        l.s_off = l.d_off + ktl_align(k / KTL_QK * 4);
        l.stride = l.s_off + ktl_align(k / KTL_QK * 4);
    } else if (kind == KTL_ACT_Q8_K || kind == KTL_ACT_Q8_KP) {
        l.d_off = ktl_align(k);
        l.s_off = l.d_off + ktl_align(k / KTL_QKK * 4);
        l.stride = l.s_off + ktl_align(k / 16 * 2);
    }
    return l;
}

/* One matmul over a set of tokens:
 *   for rows r in [r0, r1) and j in [0, ntok):
 *     v = dot(W[r, :], act row tok[j])            (tok == NULL: row j)
 *     out[(orow ? orow[j] : j) * out_stride + r] (+)= (alpha ? alpha[j] : 1) * v
 * Kernels tile over rows and tokens; rows of one call go to one thread, so outputs of one row
 * range never race. k0/k1 are internal: callers leave them 0. */
typedef struct {
    const uint8_t *w;
    int64_t row_bytes, k;
    int64_t k0, k1; /* the part of the rows this call sums (set by the kernels' driver) */
    const uint8_t *act;
    ktl_act_layout lay;
    const int32_t *tok;
    int64_t ntok;
    float *out;
    int64_t out_stride;
    const int32_t *orow;
    const float *alpha;
    int accumulate;
} ktl_gemm_args;

typedef void (*ktl_gemm_fn)(const ktl_gemm_args *a, int64_t r0, int64_t r1);
typedef void (*ktl_quant_fn)(const float *x, int64_t k, uint8_t *row, const ktl_act_layout *lay);

typedef struct {
    const char *name;
    ktl_gemm_fn gemm[31];      /* by ggml type id; NULL where unsupported */
    ktl_quant_fn quant[4];     /* by activation kind; [KTL_ACT_F32] unused */
    int act_kind[31];          /* activation kind of each weight type (by ggml type id) */
    uint64_t (*read_sum)(const uint8_t *p, int64_t n); /* sum of the 64-bit words (+ tail bytes) */
} ktl_kernels;

extern const ktl_kernels ktl_kernels_scalar;
extern const ktl_kernels ktl_kernels_avx2;
extern const ktl_kernels ktl_kernels_avx512;

const ktl_kernels *ktl_selected(void);

/* Work split: `rows` rows in `items` contiguous ranges of near-equal size (`per_thread` per
 * thread, at least 16 rows each) with boundaries on multiples of `align` rows: 4 (whole tiles)
 * when several tokens share the tiles, 1 for GEMV (one row per tile, so the ranges can be
 * exactly equal). Equal sizes matter for the memory-bound GEMV: the former fixed 48-row chunk
 * cut 2048 rows into 43 ranges for 14 threads, and the threads that drew a 4th range set the
 * time (~0.77 of an even split). Each range is one sequential stream of weight rows; items are
 * taken from an atomic counter, so a late or preempted thread's ranges go to the others. (Two
 * ranges may share the output cache line at their boundary: one store per row, negligible.) */
typedef struct {
    int64_t rows, items, align;
} row_split;

static inline row_split split_rows(int64_t rows, int threads, int64_t per_thread, int64_t align) {
    row_split s = {rows, (int64_t)threads * per_thread, align};
    if (s.items > rows / 16) s.items = rows / 16;
    if (s.items < 1) s.items = 1;
    return s;
}

static inline int64_t split_at(const row_split *s, int64_t i) {
    if (i >= s->items) return s->rows;
    int64_t r = i * s->rows / s->items;
    return r - r % s->align;
}

/* Experts forward (experts.c) on caller-owned buffers: x and y [t, hidden] fp32 or bf16, ids
 * [t, topk] int32 or int64, weights [t, topk] fp32. */
typedef struct {
    const void *x;
    int x_bf16;
    const void *ids;
    int ids_int64;
    const float *weights;
    void *y;
    int y_bf16;
} ktl_experts_io;

/* Everything one forward of up to t tokens x topk needs (routing, quantised x and h, gate/up
 * outputs, fp32 staging of bf16 x / y), in one allocation. */
typedef struct ktl_experts_ws ktl_experts_ws;
int ktl_experts_check(const ktl_experts_desc *d); /* 0 or the KTL_ERR_* of a bad layer */
ktl_experts_ws *ktl_experts_ws_create(const ktl_experts_desc *d, int64_t t, int64_t topk, int x_bf16, int y_bf16);
void ktl_experts_ws_destroy(ktl_experts_ws *ws);
/* Validates the ids (KTL_ERR_IDS, y untouched), then overwrites y. Allocates nothing. */
int ktl_experts_run(ktl_pool *pool, const ktl_experts_desc *d, ktl_experts_ws *ws, int64_t t, int64_t topk,
                    const ktl_experts_io *io);

/* Pool: runs fn(ctx, item, worker) for item in [0, n_items) on all workers (or the external
 * parallel-for), returns when all are done. One job at a time per pool (callers are
 * serialised by a mutex). */
void ktl_pool_run(ktl_pool *pool, ktl_task_fn fn, void *ctx, int64_t n_items);

/* Asynchronous work: each pool has one dispatcher thread (started on the first post) that runs
 * posted tasks in order, each as an ordinary caller of ktl_pool_run. post returns at once;
 * await blocks (spin, then sleep) until `done`. A task is posted again only once done. */
typedef struct ktl_async {
    void (*run)(struct ktl_async *self);
    struct ktl_async *next; /* queue link (the pool's) */
    _Atomic int done;
} ktl_async;
int ktl_pool_post(ktl_pool *pool, ktl_async *task); /* 0, or KTL_ERR_NOMEM (no dispatcher) */
void ktl_pool_await(ktl_pool *pool, ktl_async *task);

#endif
