/* Driver of the Linear matmul on the pool, over the selected ISA's kernels (experts: experts.c).
 *
 * Quantise the T activation rows once (parallel over tokens), then split the N output rows
 * into ranges shared by the workers (split_rows, ktl_internal.h); each range runs the tiled
 * kernel over all tokens, so a range's weight rows are read from memory once per token block. */
#include <stdlib.h>
#include <string.h>

#include "ktl_internal.h"

int64_t ktl_row_bytes(int qtype, int64_t k) {
    int be = ktl_block_elems(qtype);
    if (be == 0 || k <= 0 || k % be) return 0;
    return k / be * ktl_block_bytes(qtype);
}

static void *alloc64(int64_t bytes) {
    if (bytes <= 0) bytes = KTL_ALIGN;
    return aligned_alloc(KTL_ALIGN, (size_t)ktl_align(bytes));
}

/* ------------------------------------------------------------------ activation quantisation */

typedef struct {
    const ktl_kernels *kern;
    int kind;
    const float *x;
    int64_t x_stride; /* floats */
    int64_t k;
    uint8_t *out;
    ktl_act_layout lay;
} quant_job;

static void quant_task(void *raw, int64_t i, int worker) {
    (void)worker;
    quant_job *q = raw;
    q->kern->quant[q->kind](q->x + i * q->x_stride, q->k, q->out + i * q->lay.stride, &q->lay);
}

static void quantize_rows(ktl_pool *pool, const ktl_kernels *kern, int kind, const float *x,
                          int64_t x_stride, int64_t rows, int64_t k, uint8_t *out) {
    quant_job q = {kern, kind, x, x_stride, k, out, ktl_act_layout_of(kind, k)};
    ktl_pool_run(pool, quant_task, &q, rows);
}

int ktl_quantize_act(int kind, const float *x, int64_t k, int8_t *q, float *d, void *sums) {
    if ((kind != KTL_ACT_Q8_0 && kind != KTL_ACT_Q8_K) || k <= 0) return KTL_ERR_ARG;
    int64_t be = kind == KTL_ACT_Q8_0 ? KTL_QK : KTL_QKK;
    if (k % be) return KTL_ERR_SHAPE;
    ktl_act_layout lay = ktl_act_layout_of(kind, k);
    uint8_t *row = alloc64(lay.stride);
    if (!row) return KTL_ERR_NOMEM;
    ktl_selected()->quant[kind](x, k, row, &lay);
    memcpy(q, row, (size_t)k);
    memcpy(d, row + lay.d_off, (size_t)(k / be * 4));
    memcpy(sums, row + lay.s_off, (size_t)(kind == KTL_ACT_Q8_0 ? k / KTL_QK * 4 : k / 16 * 2));
    free(row);
    return 0;
}

/* ------------------------------------------------------------------ matmul */

/* Row ranges per thread: one token (the items are equal, and small items even out the
 * threads' finishing times) and several (whole 4-row tiles). Tuning: -DKTL_GEMV_ITEMS=8. */
#ifndef KTL_GEMV_ITEMS
#define KTL_GEMV_ITEMS 4
#endif
#define KTL_GEMM_ITEMS 4

typedef struct {
    ktl_gemm_fn fn;
    ktl_gemm_args args;
    row_split split;
} gemm_job;

static void gemm_task(void *raw, int64_t i, int worker) {
    (void)worker;
    gemm_job *g = raw;
    int64_t r0 = split_at(&g->split, i), r1 = split_at(&g->split, i + 1);
    if (r1 > r0) g->fn(&g->args, r0, r1);
}

int ktl_matmul(ktl_pool *pool, int qtype, const uint8_t *w, int64_t n, int64_t k, const float *x,
               int64_t t, float *y) {
    if (ktl_block_elems(qtype) == 0) return KTL_ERR_TYPE;
    int64_t row_bytes = ktl_row_bytes(qtype, k);
    if (row_bytes == 0 || n <= 0 || t < 0) return KTL_ERR_SHAPE;
    if (!w || (t > 0 && (!x || !y))) return KTL_ERR_ARG;
    if (t == 0) return 0;
    const ktl_kernels *kern = ktl_selected();
    int kind = kern->act_kind[qtype];
    ktl_act_layout lay = ktl_act_layout_of(kind, k);
    uint8_t *act = NULL;
    if (kind != KTL_ACT_F32) {
        act = alloc64(t * lay.stride);
        if (!act) return KTL_ERR_NOMEM;
        quantize_rows(pool, kern, kind, x, k, t, k, act);
    }
    gemm_job g;
    memset(&g, 0, sizeof g);
    g.fn = kern->gemm[qtype];
    g.args.w = w;
    g.args.row_bytes = row_bytes;
    g.args.k = k;
    g.args.act = act ? act : (const uint8_t *)x;
    g.args.lay = lay;
    g.args.ntok = t;
    g.args.out = y;
    g.args.out_stride = n;
    g.split = t == 1 ? split_rows(n, ktl_pool_threads(pool), KTL_GEMV_ITEMS, 1)
                     : split_rows(n, ktl_pool_threads(pool), KTL_GEMM_ITEMS, 4);
    ktl_pool_run(pool, gemm_task, &g, g.split.items);
    free(act);
    return 0;
}

/* ------------------------------------------------------------------ read bandwidth probe */

typedef struct {
    const uint8_t *buf;
    int64_t n, chunk;
    uint64_t *partial;
} sum_job;

static void sum_task(void *raw, int64_t i, int worker) {
    (void)worker;
    sum_job *s = raw;
    int64_t b0 = i * s->chunk, b1 = b0 + s->chunk;
    if (b1 > s->n) b1 = s->n;
    s->partial[i] = ktl_selected()->read_sum(s->buf + b0, b1 - b0);
}

uint64_t ktl_read_sum(ktl_pool *pool, const uint8_t *buf, int64_t n) {
    if (!buf || n <= 0) return 0;
    /* the same split as the matmul rows: 4 contiguous ranges per worker, 64-byte aligned */
    int64_t items = 4 * (int64_t)ktl_pool_threads(pool);
    sum_job s = {buf, n, ktl_align((n + items - 1) / items), NULL};
    items = (n + s.chunk - 1) / s.chunk;
    s.partial = calloc((size_t)items, sizeof(uint64_t));
    if (!s.partial) return 0;
    ktl_pool_run(pool, sum_task, &s, items);
    uint64_t total = 0;
    for (int64_t i = 0; i < items; i++) total += s.partial[i];
    free(s.partial);
    return total;
}
