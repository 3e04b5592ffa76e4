/* Routed experts of one MoE layer on the pool (ktl_experts, and the jobs of job.c).
 *
 * A forward: the (token, k) pairs an instance owns are grouped by expert (counting sort, by
 * the calling thread); x is quantised once per token for gate and up; gate and up of every
 * active expert run on its tokens (items = expert x range of intermediate rows) and write
 * act(gate) * up; those rows are quantised for down; down splits the hidden rows over the
 * workers, each summing every expert's weighted rows in expert order (deterministic, no
 * atomics on y) and writing y in its final dtype (bf16: round to nearest even, as torch).
 *
 * Small batches (t * topk <= FUSED_PAIRS, decode) run as ONE pool run, because at one token
 * each of the former 4-6 runs (convert x, quantise x, gate/up, quantise h, down, convert y)
 * cost a wake and join of every worker for a few microseconds of work each:
 *   - the caller routes and quantises x (T rows: cheap) before the run;
 *   - items [0, n_gu) are the gate/up items, expert-major; the worker that finishes an
 *     expert's last one (per-expert counter, acq_rel) quantises that expert's h rows and
 *     marks the expert ready (its counter set to -1, release);
 *   - items [n_gu, n_gu + n_down) are the down items; each adds the experts in expert order
 *     (the sum's order, so the bits do not change) and waits for each expert only when it
 *     reaches it, so down work starts while the last experts' gate/up still run. Items are
 *     taken in order from one atomic counter (own pool and kt-amx's parallel-for alike; a
 *     serial fallback runs them in order too), so when anyone waits, every gate/up item has
 *     been taken by a worker that runs it without waiting: no deadlock.
 * Larger batches keep separate runs (quantise x per token, gate/up, quantise h, down): there
 * the work per run dwarfs the wake-ups, and quantising h per pair spreads over all workers.
 *
 * All buffers live in one workspace (ktl_experts_ws) sized for t tokens x topk: a job owns one
 * for its life, the synchronous ktl_experts allocates one per call. */
#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "ktl_internal.h"

/* Largest t * topk run as a single pool run (decode and small batches). */
#define FUSED_PAIRS 64
/* Pauses between two sched_yield calls of a down item waiting for gate/up: a waiter gives its
 * core back now and then in case a gate/up worker was preempted (an oversubscribed host). */
#define SPINS_PER_YIELD 256

struct ktl_experts_ws {
    int64_t t, topk;   /* capacity */
    int64_t *count;    /* [E + 1] pairs of each expert, then the next free sorted position */
    int32_t *expert;   /* [E + 1] id of each active expert, ascending */
    int64_t *offset;   /* [E + 2] first sorted pair of each active expert */
    int32_t *token;    /* [P] token of each sorted pair */
    float *alpha;      /* [P] routing weight of each sorted pair */
    _Atomic int *left; /* [E + 1] gate/up items of each active expert not yet done, -1: h ready (fused run) */
    float *x32;        /* [t, H] bf16 x as fp32, or NULL (fp32 x) */
    uint8_t *xq_gate;  /* [t, lay_gate.stride] quantised x for gate, or NULL (float gate) */
    uint8_t *xq_up;    /* [t, lay_up.stride] for up, or NULL (float up, or the same kind as gate) */
    float *g, *u;      /* [P, I] gate / up outputs; g then holds act(g) * u */
    uint8_t *hq;       /* [P, lay_down.stride] quantised act(g) * u, or NULL (float down: g) */
    float *y32;        /* [t, H] fp32 sums for a bf16 y, or NULL */
    void *block;       /* the one allocation all of the above point into */
};

/* ------------------------------------------------------------------ bf16 */

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, as torch's .to(torch.bfloat16) */
static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN: torch's quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* ------------------------------------------------------------------ checks and workspace */

int ktl_experts_check(const ktl_experts_desc *d) {
    if (!d || ktl_block_elems(d->qtype_gate) == 0 || ktl_block_elems(d->qtype_up) == 0 ||
        ktl_block_elems(d->qtype_down) == 0)
        return KTL_ERR_TYPE;
    if (d->num_experts <= 0 || d->hidden <= 0 || d->inter <= 0) return KTL_ERR_SHAPE;
    if (!ktl_row_bytes(d->qtype_gate, d->hidden) || !ktl_row_bytes(d->qtype_up, d->hidden) ||
        !ktl_row_bytes(d->qtype_down, d->inter))
        return KTL_ERR_SHAPE;
    if (d->act < 0 || d->act > 3 || !d->slot_of) return KTL_ERR_ARG;
    return 0;
}

/* Activation kinds and row layouts of one layer on the selected kernels. */
typedef struct {
    int gate, up, down;
    ktl_act_layout lay_gate, lay_up, lay_down;
} act_kinds;

static act_kinds act_kinds_of(const ktl_kernels *kern, const ktl_experts_desc *d) {
    act_kinds a;
    a.gate = kern->act_kind[d->qtype_gate];
    a.up = kern->act_kind[d->qtype_up];
    a.down = kern->act_kind[d->qtype_down];
    a.lay_gate = ktl_act_layout_of(a.gate, d->hidden);
    a.lay_up = ktl_act_layout_of(a.up, d->hidden);
    a.lay_down = ktl_act_layout_of(a.down, d->inter);
    return a;
}

/* The next `bytes` (64-aligned) of the block at base + *at, or NULL when unused or only
 * measuring (base NULL). */
static void *carve(uint8_t *base, int64_t *at, int64_t bytes, int used) {
    if (!used) return NULL;
    void *p = base ? base + *at : NULL;
    *at += ktl_align(bytes > 0 ? bytes : 1);
    return p;
}

/* Points ws's buffers into `base` (NULL: only measures); returns the bytes they take. Sized
 * with the selected kernel table's activation kinds; every table uses the same kinds up to
 * Q8_K vs Q8_KP (same layout, groups reordered), so the workspace fits whichever table a
 * later run selects. */
static int64_t ws_layout(ktl_experts_ws *ws, uint8_t *base, const ktl_experts_desc *d, int x_bf16, int y_bf16) {
    int64_t E = d->num_experts, H = d->hidden, I = d->inter, t = ws->t, P = t * ws->topk, at = 0;
    act_kinds k = act_kinds_of(ktl_selected(), d);
    ws->count = carve(base, &at, (E + 1) * 8, 1);
    ws->expert = carve(base, &at, (E + 1) * 4, 1);
    ws->offset = carve(base, &at, (E + 2) * 8, 1);
    ws->token = carve(base, &at, P * 4, 1);
    ws->alpha = carve(base, &at, P * 4, 1);
    ws->left = carve(base, &at, (E + 1) * (int64_t)sizeof(_Atomic int), 1);
    ws->x32 = carve(base, &at, t * H * 4, x_bf16);
    ws->xq_gate = carve(base, &at, t * k.lay_gate.stride, k.gate != KTL_ACT_F32);
    ws->xq_up = carve(base, &at, t * k.lay_up.stride, k.up != KTL_ACT_F32 && k.up != k.gate);
    ws->g = carve(base, &at, P * I * 4, 1);
    ws->u = carve(base, &at, P * I * 4, 1);
    ws->hq = carve(base, &at, P * k.lay_down.stride, k.down != KTL_ACT_F32);
    ws->y32 = carve(base, &at, t * H * 4, y_bf16);
    return at;
}

ktl_experts_ws *ktl_experts_ws_create(const ktl_experts_desc *d, int64_t t, int64_t topk, int x_bf16, int y_bf16) {
    if (ktl_experts_check(d) != 0 || t < 0 || topk < 0) return NULL;
    ktl_experts_ws *ws = calloc(1, sizeof *ws);
    if (!ws) return NULL;
    ws->t = t;
    ws->topk = topk;
    ws->block = aligned_alloc(KTL_ALIGN, (size_t)ws_layout(ws, NULL, d, x_bf16, y_bf16));
    if (!ws->block) {
        free(ws);
        return NULL;
    }
    ws_layout(ws, ws->block, d, x_bf16, y_bf16);
    return ws;
}

void ktl_experts_ws_destroy(ktl_experts_ws *ws) {
    if (!ws) return;
    free(ws->block);
    free(ws);
}

/* ------------------------------------------------------------------ routing */

static int32_t id_at(const ktl_experts_io *io, int64_t p) {
    return io->ids_int64 ? (int32_t)((const int64_t *)io->ids)[p] : ((const int32_t *)io->ids)[p];
}

static int check_ids(const ktl_experts_io *io, int64_t pairs, int64_t E) {
    for (int64_t p = 0; p < pairs; p++) {
        int64_t e = io->ids_int64 ? ((const int64_t *)io->ids)[p] : ((const int32_t *)io->ids)[p];
        if (e < 0 || e > E) return KTL_ERR_IDS;
    }
    return 0;
}

/* Counting sort of the owned pairs by expert id (ascending); returns the active experts. */
static int64_t route(const ktl_experts_desc *d, ktl_experts_ws *ws, const ktl_experts_io *io, int64_t t, int64_t topk) {
    int64_t E = d->num_experts, P = t * topk, n_active = 0, pos = 0;
    memset(ws->count, 0, (size_t)(E + 1) * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) {
        int32_t e = id_at(io, p);
        if (e < E && d->slot_of[e] >= 0) ws->count[e]++;
    }
    for (int64_t e = 0; e < E; e++) {
        if (!ws->count[e]) continue;
        ws->expert[n_active] = (int32_t)e;
        ws->offset[n_active++] = pos;
        int64_t c = ws->count[e];
        ws->count[e] = pos; /* from here on: the next free position of expert e */
        pos += c;
    }
    ws->offset[n_active] = pos;
    for (int64_t p = 0; p < P; p++) {
        int32_t e = id_at(io, p);
        if (e < E && d->slot_of[e] >= 0) {
            int64_t at = ws->count[e]++;
            ws->token[at] = (int32_t)(p / topk);
            ws->alpha[at] = io->weights[p];
        }
    }
    return n_active;
}

/* ------------------------------------------------------------------ the forward */

typedef struct {
    const ktl_kernels *kern;
    const ktl_experts_desc *desc;
    const ktl_experts_io *io;
    ktl_experts_ws *ws;
    act_kinds kinds;
    int64_t t, n_active;
    const uint8_t *xq_gate, *xq_up; /* quantised x for gate / up (or fp32 x itself) */
    row_split isplit; /* gate/up rows of one expert: n_gu = n_active * isplit.items items */
    row_split hsplit; /* down: the hidden rows */
    int64_t n_gu;
    int fused; /* one pool run: down waits for each expert's h (ws->left[a] == -1) */
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

/* Token i's x as fp32 (converted from bf16 into x32 first) quantised for gate and up. */
static void prepare_token(const experts_job *j, int64_t i) {
    int64_t H = j->desc->hidden;
    const float *x = (const float *)j->io->x + i * H;
    if (j->io->x_bf16) {
        const uint16_t *src = (const uint16_t *)j->io->x + i * H;
        float *dst = j->ws->x32 + i * H;
        for (int64_t c = 0; c < H; c++) dst[c] = bf16_to_f32(src[c]);
        x = dst;
    }
    const act_kinds *k = &j->kinds;
    if (k->gate != KTL_ACT_F32) j->kern->quant[k->gate](x, H, j->ws->xq_gate + i * k->lay_gate.stride, &k->lay_gate);
    if (k->up != KTL_ACT_F32 && k->up != k->gate)
        j->kern->quant[k->up](x, H, j->ws->xq_up + i * k->lay_up.stride, &k->lay_up);
}

static void prepare_task(void *raw, int64_t i, int worker) {
    (void)worker;
    prepare_token(raw, i);
}

/* Rows [r0, r1) of one expert's gate or up matrix (stacked weights `base` of `qtype`) on the
 * tokens ga already names, into out. */
static void in_proj(const experts_job *j, ktl_gemm_args *ga, const uint8_t *base, int qtype, int64_t slot,
                    const uint8_t *act, const ktl_act_layout *lay, float *out, int64_t r0, int64_t r1) {
    int64_t I = j->desc->inter, H = j->desc->hidden;
    ga->w = expert_base(base, qtype, slot, I, H);
    ga->row_bytes = ktl_row_bytes(qtype, H);
    ga->act = act;
    ga->lay = *lay;
    ga->out = out;
    j->kern->gemm[qtype](ga, r0, r1);
}

/* gate and up of active expert a on its tokens, rows [r0, r1); g <- act(g) * u */
static void gate_up_rows(const experts_job *j, int64_t a, int64_t r0, int64_t r1) {
    const ktl_experts_desc *d = j->desc;
    int64_t I = d->inter, H = d->hidden;
    int64_t slot = d->slot_of[j->ws->expert[a]];
    int64_t p0 = j->ws->offset[a], cnt = j->ws->offset[a + 1] - p0;
    ktl_gemm_args ga;
    memset(&ga, 0, sizeof ga);
    ga.k = H;
    ga.tok = j->ws->token + p0;
    ga.ntok = cnt;
    ga.out_stride = I;

    in_proj(j, &ga, d->gate, d->qtype_gate, slot, j->xq_gate, &j->kinds.lay_gate, j->ws->g + p0 * I, r0, r1);
    in_proj(j, &ga, d->up, d->qtype_up, slot, j->xq_up, &j->kinds.lay_up, j->ws->u + p0 * I, r0, r1);

    for (int64_t p = p0; p < p0 + cnt; p++) {
        float *g = j->ws->g + p * I, *u = j->ws->u + p * I;
        for (int64_t r = r0; r < r1; r++) g[r] = activate(d->act, g[r]) * u[r];
    }
}

static void gate_up_item(const experts_job *j, int64_t item) {
    int64_t a = item / j->isplit.items, part = item % j->isplit.items;
    int64_t r0 = split_at(&j->isplit, part), r1 = split_at(&j->isplit, part + 1);
    if (r1 > r0) gate_up_rows(j, a, r0, r1);
}

/* pair p's act(g) * u row -> its quantised row for down */
static void quant_h(const experts_job *j, int64_t p) {
    const ktl_act_layout *lay = &j->kinds.lay_down;
    j->kern->quant[j->kinds.down](j->ws->g + p * j->desc->inter, j->desc->inter, j->ws->hq + p * lay->stride, lay);
}

static void quant_h_task(void *raw, int64_t p, int worker) {
    (void)worker;
    quant_h(raw, p);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Fused run: until active expert a's h rows are ready for down. */
static void wait_ready(const ktl_experts_ws *ws, int64_t a) {
    for (int spins = 1; atomic_load_explicit(&ws->left[a], memory_order_acquire) >= 0; spins++) {
        cpu_relax();
        if (spins % SPINS_PER_YIELD == 0) sched_yield();
    }
}

/* Hidden rows [r0, r1) of every token: zeroed, each active expert's weighted rows added in
 * expert order, then stored as bf16 when y is bf16. */
static void down_rows(const experts_job *j, int64_t r0, int64_t r1) {
    const ktl_experts_desc *d = j->desc;
    const ktl_experts_ws *ws = j->ws;
    int64_t H = d->hidden, I = d->inter;
    float *acc = ws->y32 ? ws->y32 : j->io->y; /* [t, H] */
    for (int64_t i = 0; i < j->t; i++) memset(acc + i * H + r0, 0, (size_t)(r1 - r0) * sizeof(float));
    ktl_gemm_args ga;
    memset(&ga, 0, sizeof ga);
    ga.k = I;
    ga.row_bytes = ktl_row_bytes(d->qtype_down, I);
    ga.lay = j->kinds.lay_down;
    ga.out = acc;
    ga.out_stride = H;
    ga.accumulate = 1;
    for (int64_t a = 0; a < j->n_active; a++) {
        if (j->fused) wait_ready(ws, a);
        int64_t p0 = ws->offset[a];
        ga.w = expert_base(d->down, d->qtype_down, d->slot_of[ws->expert[a]], H, I);
        ga.act = ws->hq ? ws->hq + p0 * j->kinds.lay_down.stride : (const uint8_t *)(ws->g + p0 * I);
        ga.ntok = ws->offset[a + 1] - p0;
        ga.orow = ws->token + p0;
        ga.alpha = ws->alpha + p0;
        j->kern->gemm[d->qtype_down](&ga, r0, r1);
    }
    if (!ws->y32) return;
    uint16_t *y = j->io->y;
    for (int64_t i = 0; i < j->t; i++)
        for (int64_t r = r0; r < r1; r++) y[i * H + r] = f32_to_bf16(acc[i * H + r]);
}

static void down_item(const experts_job *j, int64_t item) {
    int64_t r0 = split_at(&j->hsplit, item), r1 = split_at(&j->hsplit, item + 1);
    if (r1 > r0) down_rows(j, r0, r1);
}

static void down_task(void *raw, int64_t item, int worker) {
    (void)worker;
    down_item(raw, item);
}

static void gate_up_task(void *raw, int64_t item, int worker) {
    (void)worker;
    gate_up_item(raw, item);
}

/* The fused run's items: gate/up first (the last of an expert quantises its h rows and marks
 * it ready), then down (waiting for each expert as it comes to it). */
static void fused_task(void *raw, int64_t item, int worker) {
    (void)worker;
    experts_job *j = raw;
    if (item < j->n_gu) {
        gate_up_item(j, item);
        int64_t a = item / j->isplit.items;
        if (atomic_fetch_sub_explicit(&j->ws->left[a], 1, memory_order_acq_rel) != 1) return;
        if (j->ws->hq)
            for (int64_t p = j->ws->offset[a]; p < j->ws->offset[a + 1]; p++) quant_h(j, p);
        atomic_store_explicit(&j->ws->left[a], -1, memory_order_release); /* ready for down */
        return;
    }
    down_item(j, item - j->n_gu);
}

static void run_fused(ktl_pool *pool, experts_job *j) {
    for (int64_t i = 0; i < j->t; i++) prepare_token(j, i);
    for (int64_t a = 0; a < j->n_active; a++)
        atomic_store_explicit(&j->ws->left[a], (int)j->isplit.items, memory_order_relaxed);
    j->fused = 1;
    ktl_pool_run(pool, fused_task, j, j->n_gu + j->hsplit.items); /* the run publishes the above */
}

static void run_phases(ktl_pool *pool, experts_job *j) {
    ktl_pool_run(pool, prepare_task, j, j->t);
    ktl_pool_run(pool, gate_up_task, j, j->n_gu);
    if (j->ws->hq) ktl_pool_run(pool, quant_h_task, j, j->ws->offset[j->n_active]);
    ktl_pool_run(pool, down_task, j, j->hsplit.items);
}

/* y = 0 in its dtype (no owned pair) */
static void zero_output(const ktl_experts_desc *d, const ktl_experts_io *io, int64_t t) {
    memset(io->y, 0, (size_t)(t * d->hidden) * (io->y_bf16 ? 2 : 4));
}

int ktl_experts_run(ktl_pool *pool, const ktl_experts_desc *d, ktl_experts_ws *ws, int64_t t, int64_t topk,
                    const ktl_experts_io *io) {
    if (!ws || t > ws->t || topk > ws->topk || (io->x_bf16 && !ws->x32) || (io->y_bf16 && !ws->y32))
        return KTL_ERR_ARG;
    if (t == 0) return 0;
    int rc = check_ids(io, t * topk, d->num_experts);
    if (rc != 0) return rc;
    experts_job j;
    memset(&j, 0, sizeof j);
    j.kern = ktl_selected();
    j.desc = d;
    j.io = io;
    j.ws = ws;
    j.kinds = act_kinds_of(j.kern, d);
    j.t = t;
    j.n_active = route(d, ws, io, t, topk);
    if (j.n_active == 0) {
        zero_output(d, io, t);
        return 0;
    }
    const uint8_t *x = io->x_bf16 ? (const uint8_t *)ws->x32 : (const uint8_t *)io->x;
    j.xq_gate = j.kinds.gate == KTL_ACT_F32 ? x : ws->xq_gate;
    j.xq_up = j.kinds.up == KTL_ACT_F32 ? x : j.kinds.up == j.kinds.gate ? ws->xq_gate : ws->xq_up;
    int threads = ktl_pool_threads(pool);
    /* about 4 items per thread over all experts: each expert's rows in ceil(4T / n_active) ranges */
    j.isplit = split_rows(d->inter, 1, (4 * (int64_t)threads + j.n_active - 1) / j.n_active, t == 1 ? 1 : 4);
    j.hsplit = split_rows(d->hidden, threads, 4, t == 1 ? 1 : 4);
    j.n_gu = j.n_active * j.isplit.items;
    if (t * topk <= FUSED_PAIRS) run_fused(pool, &j);
    else run_phases(pool, &j);
    return 0;
}

int ktl_experts(ktl_pool *pool, const ktl_experts_desc *d, const float *x, int64_t t,
                const int32_t *ids, int64_t topk, const float *weights, float *y) {
    int rc = ktl_experts_check(d);
    if (rc != 0) return rc;
    if (t < 0 || topk < 0) return KTL_ERR_SHAPE;
    if (t == 0) return 0;
    if (!x || !y || (topk > 0 && (!ids || !weights))) return KTL_ERR_ARG;
    ktl_experts_io io = {x, 0, ids, 0, weights, y, 0};
    ktl_experts_ws *ws = ktl_experts_ws_create(d, t, topk, 0, 0);
    if (!ws) return KTL_ERR_NOMEM;
    rc = ktl_experts_run(pool, d, ws, t, topk, &io);
    ktl_experts_ws_destroy(ws);
    return rc;
}
