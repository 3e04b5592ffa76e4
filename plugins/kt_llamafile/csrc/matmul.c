/* Drivers: Linear matmul and routed experts on the pool, over the selected ISA's kernels.
 *
 * matmul:  quantise the T activation rows once (parallel over tokens), then split the N output
 *          rows into chunks shared by the workers; each chunk runs the tiled kernel over all
 *          tokens, so a chunk's weight rows are read from memory once per token block.
 * experts: group the (token, k) pairs by expert; phase 1 runs gate and up of every selected
 *          expert on its tokens (items = expert x row chunk) and writes act(gate) * up;
 *          phase 2 quantises those rows; phase 3 splits the hidden rows of `down` over the
 *          workers, each accumulating every expert's weighted rows into y in expert order
 *          (deterministic, no atomics). */
#include <math.h>
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

static row_split split_rows(int64_t rows, int threads, int64_t per_thread, int64_t align) {
    row_split s = {rows, (int64_t)threads * per_thread, align};
    if (s.items > rows / 16) s.items = rows / 16;
    if (s.items < 1) s.items = 1;
    return s;
}

static int64_t split_at(const row_split *s, int64_t i) {
    if (i >= s->items) return s->rows;
    int64_t r = i * s->rows / s->items;
    return r - r % s->align;
}

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
    g.split = split_rows(n, ktl_pool_threads(pool), 4, t == 1 ? 1 : 4);
    ktl_pool_run(pool, gemm_task, &g, g.split.items);
    free(act);
    return 0;
}

/* ------------------------------------------------------------------ experts */

typedef struct {
    const ktl_kernels *kern;
    const ktl_experts_desc *desc;
    int64_t n_active, inter, hidden;
    row_split isplit; /* gate/up rows of one expert: items = n_active * isplit.items */
    int32_t *expert;   /* [n_active] expert id */
    int64_t *offset;   /* [n_active + 1] first pair of each expert (pairs sorted by expert) */
    int32_t *token;    /* [P] token of each sorted pair */
    float *alpha;      /* [P] routing weight of each sorted pair */
    const uint8_t *xq_gate, *xq_up; /* quantised x for gate / up (or x itself for float) */
    ktl_act_layout lay_gate, lay_up, lay_down;
    float *g, *u;      /* [P, inter] */
    uint8_t *hq;       /* [P] quantised act(g)*u rows for down, or NULL (float down: g) */
    row_split hsplit; /* down: the hidden rows */
    float *y;
} experts_job;

static float activate(int act, float g) {
    switch (act) {
    case 0: return g / (1.0f + expf(-g));
    case 1: return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    case 2: return 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));
    default: return g > 0.0f ? g : 0.0f;
    }
}

static const uint8_t *expert_base(const uint8_t *base, int qtype, int64_t slot, int64_t rows, int64_t k) {
    return base + slot * rows * ktl_row_bytes(qtype, k);
}

static void experts_gate_up(void *raw, int64_t item, int worker) {
    (void)worker;
    experts_job *j = raw;
    const ktl_experts_desc *d = j->desc;
    int64_t a = item / j->isplit.items, part = item % j->isplit.items;
    int64_t r0 = split_at(&j->isplit, part), r1 = split_at(&j->isplit, part + 1);
    if (r1 <= r0) return;
    int64_t slot = d->slot_of[j->expert[a]];
    int64_t p0 = j->offset[a], cnt = j->offset[a + 1] - p0;
    ktl_gemm_args ga;
    memset(&ga, 0, sizeof ga);
    ga.k = j->hidden;
    ga.tok = j->token + p0;
    ga.ntok = cnt;
    ga.out_stride = j->inter;

    ga.w = expert_base(d->gate, d->qtype_gate, slot, j->inter, j->hidden);
    ga.row_bytes = ktl_row_bytes(d->qtype_gate, j->hidden);
    ga.act = j->xq_gate;
    ga.lay = j->lay_gate;
    ga.out = j->g + p0 * j->inter;
    j->kern->gemm[d->qtype_gate](&ga, r0, r1);

    ga.w = expert_base(d->up, d->qtype_up, slot, j->inter, j->hidden);
    ga.row_bytes = ktl_row_bytes(d->qtype_up, j->hidden);
    ga.act = j->xq_up;
    ga.lay = j->lay_up;
    ga.out = j->u + p0 * j->inter;
    j->kern->gemm[d->qtype_up](&ga, r0, r1);

    for (int64_t p = p0; p < p0 + cnt; p++) {
        float *g = j->g + p * j->inter, *u = j->u + p * j->inter;
        for (int64_t r = r0; r < r1; r++) g[r] = activate(d->act, g[r]) * u[r];
    }
}

static void experts_quant_h(void *raw, int64_t p, int worker) {
    (void)worker;
    experts_job *j = raw;
    int kind = j->kern->act_kind[j->desc->qtype_down];
    j->kern->quant[kind](j->g + p * j->inter, j->inter, j->hq + p * j->lay_down.stride, &j->lay_down);
}

static void experts_down(void *raw, int64_t item, int worker) {
    (void)worker;
    experts_job *j = raw;
    const ktl_experts_desc *d = j->desc;
    int64_t r0 = split_at(&j->hsplit, item), r1 = split_at(&j->hsplit, item + 1);
    if (r1 <= r0) return;
    ktl_gemm_args ga;
    memset(&ga, 0, sizeof ga);
    ga.k = j->inter;
    ga.row_bytes = ktl_row_bytes(d->qtype_down, j->inter);
    ga.lay = j->lay_down;
    ga.out = j->y;
    ga.out_stride = j->hidden;
    ga.accumulate = 1;
    for (int64_t a = 0; a < j->n_active; a++) {
        int64_t p0 = j->offset[a];
        ga.w = expert_base(d->down, d->qtype_down, d->slot_of[j->expert[a]], j->hidden, j->inter);
        ga.act = j->hq ? j->hq + p0 * j->lay_down.stride : (const uint8_t *)(j->g + p0 * j->inter);
        ga.ntok = j->offset[a + 1] - p0;
        ga.orow = j->token + p0;
        ga.alpha = j->alpha + p0;
        j->kern->gemm[d->qtype_down](&ga, r0, r1);
    }
}

int ktl_experts(ktl_pool *pool, const ktl_experts_desc *d, const float *x, int64_t t,
                const int32_t *ids, int64_t topk, const float *weights, float *y) {
    if (!d || ktl_block_elems(d->qtype_gate) == 0 || ktl_block_elems(d->qtype_up) == 0 ||
        ktl_block_elems(d->qtype_down) == 0)
        return KTL_ERR_TYPE;
    int64_t E = d->num_experts, H = d->hidden, I = d->inter;
    if (E <= 0 || H <= 0 || I <= 0 || t < 0 || topk < 0) return KTL_ERR_SHAPE;
    if (!ktl_row_bytes(d->qtype_gate, H) || !ktl_row_bytes(d->qtype_up, H) || !ktl_row_bytes(d->qtype_down, I))
        return KTL_ERR_SHAPE;
    if (d->act < 0 || d->act > 3 || !d->slot_of) return KTL_ERR_ARG;
    if (t == 0) return 0;
    if (!x || !y || (topk > 0 && (!ids || !weights))) return KTL_ERR_ARG;
    int64_t P = t * topk;
    for (int64_t p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] > E) return KTL_ERR_IDS;
    memset(y, 0, (size_t)(t * H) * sizeof(float));

    int rc = KTL_ERR_NOMEM;
    int64_t *count = calloc((size_t)E + 1, sizeof(int64_t));
    int32_t *expert = malloc(sizeof(int32_t) * (size_t)(E + 1));
    int64_t *offset = malloc(sizeof(int64_t) * (size_t)(E + 2));
    int32_t *token = malloc(sizeof(int32_t) * (size_t)(P + 1));
    float *alpha = malloc(sizeof(float) * (size_t)(P + 1));
    uint8_t *xq_gate = NULL, *xq_up = NULL, *hq = NULL;
    float *g = NULL, *u = NULL;
    if (!count || !expert || !offset || !token || !alpha) goto done;

    /* counting sort of the owned pairs by expert id (ascending) */
    int64_t owned_pairs = 0;
    for (int64_t p = 0; p < P; p++) {
        int32_t e = ids[p];
        if (e < E && d->slot_of[e] >= 0) {
            count[e]++;
            owned_pairs++;
        }
    }
    rc = 0;
    if (owned_pairs == 0) goto done;
    int64_t n_active = 0, pos = 0;
    int64_t *next = calloc((size_t)E, sizeof(int64_t));
    if (!next) {
        rc = KTL_ERR_NOMEM;
        goto done;
    }
    for (int64_t e = 0; e < E; e++) {
        if (!count[e]) continue;
        expert[n_active] = (int32_t)e;
        offset[n_active] = pos;
        next[e] = pos;
        pos += count[e];
        n_active++;
    }
    offset[n_active] = pos;
    for (int64_t p = 0; p < P; p++) {
        int32_t e = ids[p];
        if (e < E && d->slot_of[e] >= 0) {
            token[next[e]] = (int32_t)(p / topk);
            alpha[next[e]] = weights[p];
            next[e]++;
        }
    }
    free(next);

    const ktl_kernels *kern = ktl_selected();
    experts_job j;
    memset(&j, 0, sizeof j);
    j.kern = kern;
    j.desc = d;
    j.n_active = n_active;
    j.inter = I;
    j.hidden = H;
    j.expert = expert;
    j.offset = offset;
    j.token = token;
    j.alpha = alpha;
    j.y = y;
    int kg = kern->act_kind[d->qtype_gate], ku = kern->act_kind[d->qtype_up], kd = kern->act_kind[d->qtype_down];
    j.lay_gate = ktl_act_layout_of(kg, H);
    j.lay_up = ktl_act_layout_of(ku, H);
    j.lay_down = ktl_act_layout_of(kd, I);
    rc = KTL_ERR_NOMEM;
    if (kg != KTL_ACT_F32) {
        if (!(xq_gate = alloc64(t * j.lay_gate.stride))) goto done;
        quantize_rows(pool, kern, kg, x, H, t, H, xq_gate);
    }
    if (ku != KTL_ACT_F32 && ku != kg) {
        if (!(xq_up = alloc64(t * j.lay_up.stride))) goto done;
        quantize_rows(pool, kern, ku, x, H, t, H, xq_up);
    }
    j.xq_gate = kg == KTL_ACT_F32 ? (const uint8_t *)x : xq_gate;
    j.xq_up = ku == KTL_ACT_F32 ? (const uint8_t *)x : (ku == kg ? xq_gate : xq_up);
    g = alloc64(owned_pairs * I * 4);
    u = alloc64(owned_pairs * I * 4);
    if (!g || !u) goto done;
    j.g = g;
    j.u = u;
    int threads = ktl_pool_threads(pool);
    /* about 4 items per thread over all experts: each expert's rows in ceil(4T / n_active) ranges */
    j.isplit = split_rows(I, 1, (4 * (int64_t)threads + n_active - 1) / n_active, t == 1 ? 1 : 4);
    ktl_pool_run(pool, experts_gate_up, &j, n_active * j.isplit.items);
    if (kd != KTL_ACT_F32) {
        if (!(hq = alloc64(owned_pairs * j.lay_down.stride))) goto done;
        j.hq = hq;
        ktl_pool_run(pool, experts_quant_h, &j, owned_pairs);
    }
    j.hsplit = split_rows(H, threads, 4, t == 1 ? 1 : 4);
    ktl_pool_run(pool, experts_down, &j, j.hsplit.items);
    rc = 0;
done:
    free(count);
    free(expert);
    free(offset);
    free(token);
    free(alpha);
    free(xq_gate);
    free(xq_up);
    free(hq);
    free(g);
    free(u);
    return rc;
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
