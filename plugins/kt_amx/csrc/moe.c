/* One MoE layer's routed experts: descriptor checks, the workspace, and the phases of a
 * forward (see kt_job.h). Kernels come from the selected kt_isa_ops table.
 *
 * Row order: the (token, k) pairs routed to owned experts are sorted by expert (stable, in
 * token order) and each expert's block of rows is padded to a multiple of 16 with zero rows,
 * so that an expert's activations are contiguous rows (an AMX A operand) and each phase item
 * writes rows no other item writes. Every buffer is sized from T and K (kt_moe_reserve).
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kt_job.h"

#define KT_MCH 256 /* rows of one gate/up chunk (per-thread scratch) */
#define KT_QCH 4   /* tokens per quantise item */
#define KT_RCH 16  /* rows per gather / quantise-h item */
#define KT_TCH 4   /* tokens per reduce item */
#define KT_DECODE_TOKENS 4        /* one-phase decode up to this many tokens (default) */
#define KT_DECODE_TOKENS_MAX 16   /* ... and at most (KT_AMX_DECODE_TOKENS) */
#define KT_ITEMS_PER_WORKER 8     /* one-phase decode: items per worker (balance) */
#define KT_ITEM_MAX_BYTES (512 << 10) /* ... but no item streams more weights than this */

struct kt_moe {
    kt_layer d;
    kt_fmt fmt;
    kt_mat gate, up, down;
    int32_t *slot_of; /* own copy, [n_experts + 1] */
    uint8_t *ws;
    size_t ws_bytes;
    int32_t amx_min_rows;
    int32_t decode_tokens; /* one-phase decode up to this many tokens (0: never) */
    /* a layer of NUMA parts (kt_moe_combine); n_parts 0 for a plain layer. Every part writes
     * an fp32 partial y; the partials are summed in part order. */
    int32_t n_parts, mode;
    kt_moe **parts;
    int32_t *node_of_worker;
    int32_t n_workers;
    int32_t res_T;        /* tokens the part workspaces and the partial sums are sized for */
    float *partial;       /* [n_parts][T][H] fp32 partial outputs */
    int32_t *sum_rows;    /* [T][n_parts] row of each partial in `partial` */
    float *ones;          /* [T * n_parts] weights 1 of the sum */
};

enum { KT_NUMA_SPLIT = 0, KT_NUMA_MIRROR = 1 };

static int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }
static int32_t min32(int32_t a, int32_t b) { return a < b ? a : b; }

int64_t kt_matrix_weight_bytes(int32_t format, int32_t n, int32_t k) {
    if (n <= 0 || k <= 0) return -1;
    switch (format) {
    case KT_FMT_BF16: return (int64_t)n * k * 2;
    case KT_FMT_INT8: return (int64_t)n * k;
    case KT_FMT_INT4: return (int64_t)n * k / 2;
    default: return -1;
    }
}

int64_t kt_matrix_scale_bytes(int32_t format, int32_t n, int32_t k, int32_t group, int32_t scale_f32) {
    if (format == KT_FMT_BF16) return 0;
    if (format != KT_FMT_INT8 && format != KT_FMT_INT4) return -1;
    if (group == 0) group = k;
    if (n <= 0 || k <= 0 || group <= 0 || k % group || n % KT_PANEL) return -1;
    return (int64_t)n * (k / group) * (scale_f32 ? 4 : 2);
}

static int make_mat(const kt_layer *d, const kt_matrix *src, const char *name, int32_t n, int32_t k, kt_mat *m,
                    char *err, int32_t err_len) {
    if (src->n != n || src->k != k) {
        snprintf(err, err_len, "%s: shape [%d, %d], expected [%d, %d]", name, src->n, src->k, n, k);
        return 0;
    }
    if (n % 32 || k % 32) {
        snprintf(err, err_len, "%s: dimensions [%d, %d] must be multiples of 32", name, n, k);
        return 0;
    }
    const int32_t group = d->format == KT_FMT_BF16 ? k : (d->group == 0 ? k : d->group);
    if (group <= 0 || group % 32 || k % group) {
        snprintf(err, err_len, "%s: group %d must be a multiple of 32 dividing %d", name, group, k);
        return 0;
    }
    if (!src->w || (d->format != KT_FMT_BF16 && !src->scale)) {
        snprintf(err, err_len, "%s: missing packed weights or scales", name);
        return 0;
    }
    if (d->format == KT_FMT_INT4 && !d->symmetric && !src->zmin) {
        snprintf(err, err_len, "%s: affine int4 needs mins", name);
        return 0;
    }
    m->w = src->w;
    m->scale = d->format == KT_FMT_BF16 ? NULL : src->scale;
    m->zmin = d->format == KT_FMT_INT4 && !d->symmetric ? src->zmin : NULL;
    m->n = n, m->k = k, m->group = group, m->ngroups = k / group;
    m->w_panel = kt_matrix_weight_bytes(d->format, KT_PANEL, k);
    m->w_slot = m->w_panel * (n / KT_PANEL);
    m->s_panel = d->format == KT_FMT_BF16 ? 0 : (int64_t)KT_PANEL * m->ngroups * (d->scale_f32 ? 4 : 2);
    m->s_slot = m->s_panel * (n / KT_PANEL);
    return 1;
}

kt_moe *kt_moe_create(const kt_layer *d, char *err, int32_t err_len) {
    char dummy[8];
    if (!err || err_len <= 0) err = dummy, err_len = sizeof dummy;
    err[0] = 0;
    if (d->format != KT_FMT_BF16 && d->format != KT_FMT_INT8 && d->format != KT_FMT_INT4) {
        snprintf(err, err_len, "unknown format %d", d->format);
        return NULL;
    }
    if (d->act < KT_ACT_SILU || d->act > KT_ACT_RELU) {
        snprintf(err, err_len, "unknown activation %d", d->act);
        return NULL;
    }
    if (d->n_experts <= 0 || d->n_slots <= 0 || d->n_slots > d->n_experts || !d->slot_of) {
        snprintf(err, err_len, "bad expert counts (E=%d, owned=%d)", d->n_experts, d->n_slots);
        return NULL;
    }
    kt_moe *m = calloc(1, sizeof *m);
    m->d = *d;
    if (!make_mat(d, &d->gate, "gate", d->inter, d->hidden, &m->gate, err, err_len) ||
        !make_mat(d, &d->up, "up", d->inter, d->hidden, &m->up, err, err_len) ||
        !make_mat(d, &d->down, "down", d->hidden, d->inter, &m->down, err, err_len)) {
        free(m);
        return NULL;
    }
    m->slot_of = malloc(sizeof(int32_t) * ((size_t)d->n_experts + 1));
    for (int32_t e = 0; e <= d->n_experts; e++) {
        const int32_t s = e < d->n_experts ? d->slot_of[e] : -1;
        if (s < -1 || s >= d->n_slots) {
            snprintf(err, err_len, "slot_of[%d] = %d is not a slot of %d owned experts", e, s, d->n_slots);
            free(m->slot_of);
            free(m);
            return NULL;
        }
        m->slot_of[e] = s;
    }
    m->d.slot_of = m->slot_of;
    m->fmt.format = d->format;
    m->fmt.scale_f32 = d->scale_f32 ? 1 : 0;
    m->fmt.zero = d->format == KT_FMT_INT8 ? 128 : (d->format == KT_FMT_INT4 && d->symmetric ? 8 : 0);
    m->fmt.has_min = d->format == KT_FMT_INT4 && !d->symmetric;
    const char *env = getenv("KT_AMX_MIN_ROWS");
    /* AMX tiles from 9 rows: up to 8 rows the vector kernel reads each panel once as well. */
    m->amx_min_rows = env && atoi(env) > 0 ? atoi(env) : 9;
    env = getenv("KT_AMX_DECODE_TOKENS");
    m->decode_tokens = env ? min32(KT_DECODE_TOKENS_MAX, atoi(env) < 0 ? 0 : atoi(env)) : KT_DECODE_TOKENS;
    return m;
}

void kt_moe_destroy(kt_moe *m) {
    if (!m) return;
    free(m->parts);
    free(m->node_of_worker);
    free(m->partial);
    free(m->sum_rows);
    free(m->ones);
    free(m->ws);
    free(m->slot_of);
    free(m);
}

size_t kt_moe_workspace_bytes(const kt_moe *m) {
    size_t n = m->ws_bytes;
    for (int32_t j = 0; j < m->n_parts; j++) n += kt_moe_workspace_bytes(m->parts[j]);
    if (m->n_parts)
        n += (size_t)m->res_T * m->n_parts * ((size_t)m->d.hidden * 4 + 8);
    return n;
}

kt_moe *kt_moe_combine(kt_moe *const *parts, int32_t n_parts, int32_t mode, const int32_t *node_of_worker,
                       int32_t n_workers, char *err, int32_t err_len) {
    char dummy[8];
    if (!err || err_len <= 0) err = dummy, err_len = sizeof dummy;
    err[0] = 0;
    if (n_parts < 1 || !parts || (mode != KT_NUMA_SPLIT && mode != KT_NUMA_MIRROR) || n_workers < 0 ||
        (n_workers > 0 && !node_of_worker)) {
        snprintf(err, err_len, "bad NUMA parts (n=%d, mode=%d)", n_parts, mode);
        return NULL;
    }
    int32_t inter = 0;
    for (int32_t j = 0; j < n_parts; j++) {
        const kt_moe *p = parts[j];
        if (!p || p->n_parts || p->d.hidden != parts[0]->d.hidden || p->d.n_experts != parts[0]->d.n_experts ||
            p->d.format != parts[0]->d.format || (mode == KT_NUMA_MIRROR && p->d.inter != parts[0]->d.inter)) {
            snprintf(err, err_len, "NUMA part %d does not match part 0", j);
            return NULL;
        }
        inter += p->d.inter;
    }
    kt_moe *m = calloc(1, sizeof *m);
    m->d = parts[0]->d;
    m->d.inter = mode == KT_NUMA_SPLIT ? inter : parts[0]->d.inter;
    m->fmt = parts[0]->fmt;
    m->amx_min_rows = parts[0]->amx_min_rows;
    m->n_parts = n_parts;
    m->mode = mode;
    m->parts = malloc(sizeof(kt_moe *) * (size_t)n_parts);
    memcpy(m->parts, parts, sizeof(kt_moe *) * (size_t)n_parts);
    m->n_workers = n_workers;
    m->node_of_worker = malloc(sizeof(int32_t) * (size_t)(n_workers > 0 ? n_workers : 1));
    if (n_workers > 0) memcpy(m->node_of_worker, node_of_worker, sizeof(int32_t) * (size_t)n_workers);
    return m;
}

static int reserve_parts(kt_moe *m, int32_t T, int32_t K) {
    const int32_t n = m->n_parts;
    for (int32_t j = 0; j < n; j++)
        if (kt_moe_reserve(m->parts[j], T, K) != 0) return -1;
    if (T > m->res_T) {
        const size_t rows = (size_t)T * n;
        float *partial = malloc(rows * (size_t)m->d.hidden * sizeof(float) + KT_ALIGN);
        int32_t *sum_rows = malloc(rows * sizeof(int32_t));
        float *ones = malloc(rows * sizeof(float));
        if (!partial || !sum_rows || !ones) {
            free(partial), free(sum_rows), free(ones);
            return -1;
        }
        free(m->partial), free(m->sum_rows), free(m->ones);
        m->partial = partial, m->sum_rows = sum_rows, m->ones = ones;
    }
    if (T > m->res_T) m->res_T = T;
    return 0;
}

/* Carves the workspace for T tokens x top-k K; base NULL only measures. Returns its size. */
static size_t ws_layout(const kt_moe *m, int32_t T, int32_t K, int32_t threads, uint8_t *base, kt_ws *ws) {
    const int32_t H = m->d.hidden, I = m->d.inter, n = m->d.n_slots;
    const int32_t P = T * K;
    const int32_t elem = m->d.format == KT_FMT_BF16 ? 4 : 1; /* widest activation element of any ISA */
    const int32_t gx = m->gate.ngroups, gi = m->down.ngroups;
    size_t off = 0;
#define KT_TAKE(field, type, count)                                          \
    do {                                                                     \
        ws->field = (type *)(base ? base + off : NULL);                      \
        off += (size_t)kt_round_up((int64_t)(count) * (int64_t)sizeof(type), KT_ALIGN); \
    } while (0)
    ws->rmax = P + 15 * min32(n, P);
    ws->xrow = kt_round_up((int64_t)H * elem, KT_ALIGN);
    ws->hrow = kt_round_up((int64_t)I * elem, KT_ALIGN);
    ws->scratch_bytes = kt_round_up(2 * KT_MCH * KT_PANEL * 4 + kt_amx_scratch_bytes(H > I ? H : I), KT_ALIGN);
    KT_TAKE(tk_row, int32_t, P);
    KT_TAKE(counts, int32_t, n);
    KT_TAKE(fill, int32_t, n);
    KT_TAKE(row_off, int32_t, n);
    KT_TAKE(active, int32_t, 3 * (int64_t)n);
    KT_TAKE(pair_token, int32_t, ws->rmax);
    KT_TAKE(xq, uint8_t, (int64_t)T * ws->xrow);
    KT_TAKE(xs, float, (int64_t)T * gx);
    KT_TAKE(xsum, int32_t, (int64_t)T * gx);
    KT_TAKE(xa, uint8_t, (int64_t)ws->rmax * ws->xrow);
    KT_TAKE(xas, float, (int64_t)ws->rmax * gx);
    KT_TAKE(xasum, int32_t, (int64_t)ws->rmax * gx);
    KT_TAKE(h, float, (int64_t)ws->rmax * I);
    KT_TAKE(hq, uint8_t, (int64_t)ws->rmax * ws->hrow);
    KT_TAKE(hs, float, (int64_t)ws->rmax * gi);
    KT_TAKE(hsum, int32_t, (int64_t)ws->rmax * gi);
    KT_TAKE(ypair, float, (int64_t)ws->rmax * H);
    KT_TAKE(gu_left, _Atomic int32_t, n);
    KT_TAKE(scratch, uint8_t, (int64_t)threads * ws->scratch_bytes);
#undef KT_TAKE
    return off;
}

static int32_t pool_threads_or_one(void) {
    const int n = kt_pool_size();
    return n > 0 ? n : 1;
}

int kt_moe_reserve(kt_moe *m, int32_t T, int32_t K) {
    if (T < 0 || K <= 0) return -1;
    if (m->n_parts) return reserve_parts(m, T, K);
    kt_ws probe;
    const size_t need = ws_layout(m, T, K, pool_threads_or_one(), NULL, &probe);
    if (need <= m->ws_bytes) return 0;
    void *p = NULL;
    if (posix_memalign(&p, 4096, need ? need : KT_ALIGN) != 0) return -1;
    free(m->ws);
    m->ws = p;
    m->ws_bytes = need;
    return 0;
}

/* --------------------------------------------------------------------------- jobs */

kt_job *kt_job_create(void) {
    void *p = NULL;
    if (posix_memalign(&p, 64, sizeof(kt_job)) != 0) return NULL;
    memset(p, 0, sizeof(kt_job));
    return p;
}

static void free_subs(kt_job *job) {
    for (int32_t s = 0; s < job->n_subs; s++) kt_job_destroy(job->subs[s]);
    free(job->subs);
    free(job->sub_wmap);
    job->subs = NULL, job->sub_wmap = NULL, job->n_subs = 0;
}

void kt_job_destroy(kt_job *job) {
    if (!job) return;
    kt_pool_forget_job(job);
    free_subs(job);
    free(job);
}

int kt_job_set(kt_job *job, kt_moe *moe, int32_t T, int32_t K, const void *x, int32_t x_dtype, const void *ids,
               int32_t ids_int64, const float *w, void *y, int32_t n_threads) {
    if (!job || !moe || T < 0 || K <= 0 || (x_dtype != KT_DT_F32 && x_dtype != KT_DT_BF16)) return -1;
    if (T > 0 && (!x || !ids || !w || !y)) return -1;
    job->kind = KT_JOB_MOE;
    job->moe = moe;
    job->lin = NULL;
    job->T = T, job->K = K;
    job->x = x, job->x_dtype = x_dtype;
    job->ids = ids, job->ids_int64 = ids_int64 ? 1 : 0;
    job->w = w, job->y = y;
    job->y_dtype = x_dtype;
    job->n_threads = n_threads;
    job->is_set = 1;
    return 0;
}

void kt_job_reset_run(kt_job *job) {
    for (int p = 0; p < KT_NUM_PHASES; p++) atomic_store_explicit(&job->next[p], 0, memory_order_relaxed);
    atomic_store_explicit(&job->for_next, 0, memory_order_relaxed);
    atomic_store(&job->bar_count, 0);
    atomic_store(&job->bar_gen, 0);
    atomic_store(&job->status, job->prep_status);
}

/* Workers of part j among the first nw: those on node j, else one borrowed (j % nw). */
static int32_t part_workers(const kt_moe *m, int32_t j, int32_t nw, int32_t pool_threads, int32_t *wmap) {
    int32_t count = 0;
    for (int32_t w = 0; w < pool_threads; w++)
        wmap[w] = w < nw && w < m->n_workers && m->node_of_worker[w] == j ? count++ : -1;
    if (count == 0) wmap[j % nw] = count++;
    return count;
}

static int prepare_parts(kt_job *job, int32_t pool_threads) {
    kt_moe *m = job->moe;
    const int32_t n = m->n_parts, T = job->T, H = m->d.hidden, K = job->K;
    if (job->n_subs != n) {
        free_subs(job);
        job->subs = calloc((size_t)n, sizeof(kt_job *));
        job->sub_wmap = malloc(sizeof(int32_t) * (size_t)n * (size_t)pool_threads);
        if (!job->subs || !job->sub_wmap) return KT_E_WORKSPACE;
        job->n_subs = n;
        for (int32_t j = 0; j < n; j++)
            if (!(job->subs[j] = kt_job_create())) return KT_E_WORKSPACE;
    }
    if (T > m->res_T) return KT_E_WORKSPACE;
    job->nw = job->n_threads > 0 && job->n_threads < pool_threads ? job->n_threads : pool_threads;
    job->wmap = NULL;
    job->n_phases = 1;
    job->use_amx_min = m->amx_min_rows;
    memset(job->n_items, 0, sizeof job->n_items);
    for (int32_t j = 0; j < n; j++) {
        kt_job *sub = job->subs[j];
        sub->kind = KT_JOB_MOE;
        sub->moe = m->parts[j];
        sub->T = T, sub->K = K;
        sub->x = job->x, sub->x_dtype = job->x_dtype;
        sub->ids = job->ids, sub->ids_int64 = job->ids_int64;
        sub->w = job->w;
        sub->y = m->partial + (int64_t)j * T * H; /* fp32 partial of this part */
        sub->y_dtype = KT_DT_F32;
        sub->part_id = m->mode == KT_NUMA_MIRROR ? j : 0;
        sub->part_n = m->mode == KT_NUMA_MIRROR ? n : 1;
        sub->n_threads = job->n_threads;
        sub->is_set = 1;
        const int status = kt_job_prepare(sub, pool_threads);
        if (status != KT_OK) return status;
        int32_t *wmap = job->sub_wmap + (int64_t)j * pool_threads;
        sub->nw = part_workers(m, j, job->nw, pool_threads, wmap);
        sub->wmap = wmap;
        kt_job_reset_run(sub);
    }
    for (int32_t t = 0; t < T; t++)
        for (int32_t j = 0; j < n; j++) {
            m->sum_rows[(int64_t)t * n + j] = j * T + t;
            m->ones[(int64_t)t * n + j] = 1.0f;
        }
    job->n_items[0] = ceil_div(T, KT_TCH);
    return KT_OK;
}

static int prepare_one_phase(kt_job *j);

int kt_job_prepare(kt_job *job, int32_t pool_threads) {
    job->prep_status = KT_OK;
    job->one_phase = 0;
    if (job->kind == KT_JOB_FOR) {
        job->ops = NULL;
        job->n_phases = 1;
        if (!job->wmap) job->nw = job->nw > 0 && job->nw < pool_threads ? job->nw : pool_threads;
        return KT_OK;
    }
    job->ops = kt_isa_ops_selected();
    if (!job->ops) return KT_E_NO_ISA;
    if (job->kind == KT_JOB_LINEAR) return kt_linear_prepare(job, pool_threads);
    if (job->kind == KT_JOB_MOE && job->is_set && job->moe->n_parts) return prepare_parts(job, pool_threads);
    if (job->kind != KT_JOB_MOE) {
        job->n_phases = 1;
        job->nw = job->n_threads > 0 && job->n_threads < pool_threads ? job->n_threads : pool_threads;
        memset(job->n_items, 0, sizeof job->n_items);
        job->n_items[0] = job->nw;
        atomic_store(&job->bench_ops, 0);
        return KT_OK;
    }
    if (!job->is_set) return KT_E_NOT_SET;
    kt_moe *m = job->moe;
    const size_t need = ws_layout(m, job->T, job->K, pool_threads, m->ws, &job->ws);
    if (need > m->ws_bytes || (!m->ws && job->T > 0)) return KT_E_WORKSPACE;
    if (m->d.format == KT_FMT_BF16 && job->ops->level == KT_ISA_AVX2) {
        job->ws.hq = (uint8_t *)job->ws.h; /* fp32 activations: h is already in kernel format */
        job->ws.hrow = (int64_t)m->d.inter * 4;
    }
    job->nw = job->n_threads > 0 && job->n_threads < pool_threads ? job->n_threads : pool_threads;
    job->wmap = NULL;
    job->n_phases = KT_NUM_PHASES;
    job->use_amx_min = m->amx_min_rows;
    job->n_rows = job->n_active = 0;
    memset(job->n_items, 0, sizeof job->n_items);
    if (job->T > 0 && !prepare_one_phase(job)) job->n_items[KT_PH_ROUTE_QUANT] = 1 + ceil_div(job->T, KT_QCH);
    return KT_OK;
}

/* Panels per work item: enough items to balance the workers (about 16 each), few enough that
 * taking an item (one atomic on a shared line) stays cheap next to streaming its panels. */
static int32_t panels_per_item(int32_t n_active, int32_t panels, int32_t nw) {
    const int64_t per = (int64_t)n_active * panels / (16 * (int64_t)(nw > 0 ? nw : 1));
    return per < 1 ? 1 : (per > 8 ? 8 : (int32_t)per);
}

/* Sorts the (token, k) pairs routed to owned experts by expert into rows: each active
 * expert's rows are contiguous, in token order, padded to a multiple of `pad` with rows of
 * token -1. Fills tk_row, pair_token, active; sets n_rows, n_active. Returns 1 when an
 * id is out of range (that pair adds nothing). */
static int route_pairs(kt_job *j, int32_t pad) {
    kt_moe *m = j->moe;
    kt_ws *w = &j->ws;
    const int32_t E = m->d.n_experts, n = m->d.n_slots, T = j->T, K = j->K, P = T * K;
    int bad = 0;
    memset(w->counts, 0, sizeof(int32_t) * (size_t)n);
    for (int32_t p = 0; p < P; p++) {
        const int64_t id = j->ids_int64 ? ((const int64_t *)j->ids)[p] : ((const int32_t *)j->ids)[p];
        int32_t s = -1;
        if (id >= 0 && id <= E)
            s = m->slot_of[id];
        else
            bad = 1;
        w->tk_row[p] = s;
        if (s >= 0) w->counts[s]++;
    }
    if (j->part_n > 1) /* a mirror part: every part_n-th active expert, from part_id */
        for (int32_t s = 0, rank = 0; s < n; s++)
            if (w->counts[s] && rank++ % j->part_n != j->part_id) w->counts[s] = 0;
    int32_t rows = 0, na = 0;
    for (int32_t s = 0; s < n; s++) {
        w->fill[s] = 0;
        w->row_off[s] = rows;
        if (!w->counts[s]) continue;
        w->active[3 * na] = s, w->active[3 * na + 1] = rows, w->active[3 * na + 2] = w->counts[s];
        na++;
        rows += (int32_t)kt_round_up(w->counts[s], pad);
    }
    for (int32_t p = 0; p < P; p++) {
        const int32_t s = w->tk_row[p];
        if (s < 0) continue;
        if (!w->counts[s]) { /* another mirror part computes it */
            w->tk_row[p] = -1;
            continue;
        }
        const int32_t r = w->row_off[s] + w->fill[s]++;
        w->pair_token[r] = p / K;
        w->tk_row[p] = r;
    }
    for (int32_t a = 0; a < na; a++)
        for (int32_t r = w->active[3 * a + 1] + w->active[3 * a + 2]; r % pad; r++) w->pair_token[r] = -1;
    j->n_rows = rows;
    j->n_active = na;
    return bad;
}

static void route(kt_job *j) {
    kt_moe *m = j->moe;
    kt_ws *w = &j->ws;
    if (route_pairs(j, KT_PANEL)) atomic_fetch_or(&j->status, KT_E_IDS);
    const int32_t rows = j->n_rows, na = j->n_active;
    const int alias_h = (uint8_t *)w->h == w->hq;
    const int32_t npI = m->d.inter / KT_PANEL, npH = m->d.hidden / KT_PANEL;
    j->ppi_I = panels_per_item(na, npI, j->nw);
    j->ppi_H = panels_per_item(na, npH, j->nw);
    j->n_items[KT_PH_GATHER] = ceil_div(rows, KT_RCH);
    j->n_items[KT_PH_GATE_UP] = na * ceil_div(npI, j->ppi_I);
    j->n_items[KT_PH_QUANT_H] = alias_h ? 0 : ceil_div(rows, KT_RCH);
    j->n_items[KT_PH_DOWN] = na * ceil_div(npH, j->ppi_H);
    j->n_items[KT_PH_REDUCE] = ceil_div(j->T, KT_TCH);
}

static void quantize_x(kt_job *j, int32_t item) {
    kt_moe *m = j->moe;
    kt_ws *w = &j->ws;
    const int32_t t0 = (item - 1) * KT_QCH, t1 = min32(j->T, t0 + KT_QCH), H = m->d.hidden;
    const int64_t esz = j->x_dtype == KT_DT_F32 ? 4 : 2;
    const int32_t gx = m->gate.ngroups;
    j->ops->quantize(&m->fmt, H, m->gate.group, (const uint8_t *)j->x + (int64_t)t0 * H * esz, j->x_dtype, H,
                     w->xq + t0 * w->xrow, w->xrow, w->xs + (int64_t)t0 * gx, w->xsum + (int64_t)t0 * gx, gx, t1 - t0);
}

static void gather_x(kt_job *j, int32_t item) {
    kt_moe *m = j->moe;
    kt_ws *w = &j->ws;
    const int32_t r0 = item * KT_RCH, r1 = min32(j->n_rows, r0 + KT_RCH), gx = m->gate.ngroups;
    const size_t bytes = (size_t)m->d.hidden * kt_act_elem_bytes(m->d.format, j->ops->level);
    const int is_int = m->d.format != KT_FMT_BF16;
    for (int32_t r = r0; r < r1; r++) {
        const int32_t t = w->pair_token[r];
        uint8_t *dst = w->xa + r * w->xrow;
        if (t >= 0) {
            memcpy(dst, w->xq + t * w->xrow, bytes);
            if (is_int) {
                memcpy(w->xas + (int64_t)r * gx, w->xs + (int64_t)t * gx, sizeof(float) * gx);
                memcpy(w->xasum + (int64_t)r * gx, w->xsum + (int64_t)t * gx, sizeof(int32_t) * gx);
            }
        } else {
            memset(dst, 0, bytes);
            if (is_int) {
                memset(w->xas + (int64_t)r * gx, 0, sizeof(float) * gx);
                memset(w->xasum + (int64_t)r * gx, 0, sizeof(int32_t) * gx);
            }
        }
    }
}

static void gate_up_panels(kt_job *j, const kt_act *A, int32_t a, int32_t p0, int32_t np, int32_t worker);

/* Gate/up item `item` of a job whose items cover ppi_I panels of one active expert each. */
static int32_t gate_up_item(kt_job *j, const kt_act *A, int32_t item, int32_t worker) {
    const int32_t npI = j->moe->d.inter / KT_PANEL, per = ceil_div(npI, j->ppi_I);
    const int32_t a = item / per, p0 = (item % per) * j->ppi_I;
    gate_up_panels(j, A, a, p0, min32(npI - p0, j->ppi_I), worker);
    return a;
}

static void gate_up(kt_job *j, int32_t item, int32_t worker) {
    const kt_ws *w = &j->ws;
    const kt_act A = {w->xa, w->xrow, w->xas, w->xasum, j->moe->gate.ngroups};
    gate_up_item(j, &A, item, worker);
}

/* h rows of active expert a, panels [p0, p0 + np): h = act(gate x) * (up x), x rows from A.
 * All np panels go to each kernel call (one longer weight stream; AMX tiles of two panels
 * share their A tiles), in chunks of rows that keep the [rows][16 np] fp32 gate and up
 * results within the worker's scratch. */
static void gate_up_panels(kt_job *j, const kt_act *A, int32_t a, int32_t p0, int32_t np, int32_t worker) {
    kt_moe *m = j->moe;
    kt_ws *w = &j->ws;
    const kt_isa_ops *ops = j->ops;
    const int32_t slot = w->active[3 * a], off = w->active[3 * a + 1], cnt = w->active[3 * a + 2];
    const int32_t I = m->d.inter, cols = np * KT_PANEL;
    const int32_t chunk = KT_MCH / np / KT_PANEL * KT_PANEL; /* np <= 16 (both callers): >= 16 rows */
    uint8_t *scratch = w->scratch + worker * w->scratch_bytes;
    float *sg = (float *)scratch, *su = sg + KT_MCH * KT_PANEL; /* [chunk][cols] each */
    uint8_t *amx_scratch = (uint8_t *)(su + KT_MCH * KT_PANEL);
    const int use_amx = ops->gemm_amx && cnt >= j->use_amx_min;
    for (int32_t m0 = 0; m0 < cnt; m0 += chunk) {
        const int32_t mc = min32(chunk, cnt - m0);
        if (use_amx) {
            const int32_t mp = (int32_t)kt_round_up(mc, KT_PANEL);
            ops->gemm_amx(&m->fmt, &m->gate, slot, p0, np, A, off + m0, mp, sg, cols, amx_scratch);
            ops->gemm_amx(&m->fmt, &m->up, slot, p0, np, A, off + m0, mp, su, cols, amx_scratch);
        } else {
            ops->gemm(&m->fmt, &m->gate, slot, p0, np, A, off + m0, mc, sg, cols);
            ops->gemm(&m->fmt, &m->up, slot, p0, np, A, off + m0, mc, su, cols);
        }
        ops->act_mul(m->d.act, w->h + (int64_t)(off + m0) * I + p0 * KT_PANEL, I, sg, su, cols, mc, cols);
    }
}

/* h rows r0..r1-1 to the down kernel's activation format (padding rows: zeros). */
static void quantize_h_rows(kt_job *j, int32_t r0, int32_t r1) {
    kt_moe *m = j->moe;
    kt_ws *w = &j->ws;
    const int32_t I = m->d.inter, gi = m->down.ngroups;
    const size_t bytes = (size_t)I * kt_act_elem_bytes(m->d.format, j->ops->level);
    for (int32_t r = r0; r < r1; r++) {
        uint8_t *dst = w->hq + r * w->hrow;
        if (w->pair_token[r] >= 0) {
            j->ops->quantize(&m->fmt, I, m->down.group, w->h + (int64_t)r * I, KT_DT_F32, I, dst, w->hrow, w->hs + (int64_t)r * gi,
                             w->hsum + (int64_t)r * gi, gi, 1);
        } else {
            memset(dst, 0, bytes);
            memset(w->hs + (int64_t)r * gi, 0, sizeof(float) * gi);
            memset(w->hsum + (int64_t)r * gi, 0, sizeof(int32_t) * gi);
        }
    }
}

static void quantize_h(kt_job *j, int32_t item) { quantize_h_rows(j, item * KT_RCH, min32(j->n_rows, (item + 1) * KT_RCH)); }

static void down(kt_job *j, int32_t item, int32_t worker) {
    kt_moe *m = j->moe;
    kt_ws *w = &j->ws;
    const kt_isa_ops *ops = j->ops;
    const int32_t H = m->d.hidden, npH = H / KT_PANEL, per = ceil_div(npH, j->ppi_H);
    const int32_t a = item / per, p0 = (item % per) * j->ppi_H, np = min32(npH - p0, j->ppi_H);
    const int32_t slot = w->active[3 * a], off = w->active[3 * a + 1], cnt = w->active[3 * a + 2];
    const kt_act A = {w->hq, w->hrow, w->hs, w->hsum, m->down.ngroups};
    float *out = w->ypair + (int64_t)off * H + p0 * KT_PANEL;
    if (ops->gemm_amx && cnt >= j->use_amx_min) {
        uint8_t *amx_scratch = w->scratch + worker * w->scratch_bytes + 2 * KT_MCH * KT_PANEL * 4;
        ops->gemm_amx(&m->fmt, &m->down, slot, p0, np, &A, off, (int32_t)kt_round_up(cnt, KT_PANEL), out, H,
                      amx_scratch);
    } else {
        ops->gemm(&m->fmt, &m->down, slot, p0, np, &A, off, cnt, out, H);
    }
}

/* ------------------------------------------------------------------ one-phase decode
 *
 * A few tokens whose experts all run on the vector kernels (a decode step) skip the six
 * phases: at one token their barriers, gathers and hand-offs cost more than streaming a small
 * expert's weights. The submitting thread routes the pairs (rows unpadded) and quantises x
 * while preparing; the workers' one phase has the gate/up items (expert-major, x rows read in
 * place through A.rows) followed by the down items. The worker that finishes an expert's last
 * gate/up item quantises that expert's h rows and marks the expert ready (gu_left = -1). A
 * down item (a range of H panels over every active expert, then those columns of y summed as
 * the phases' reduce sums them, so the output is bit for bit the phases') runs the experts in
 * the order they become ready: each expert's rows go to their own ypair rows, so the order
 * changes no bit, and no worker idles until the slowest expert's gate/up is done. Items are
 * taken in order from one counter, so when anyone waits, every gate/up item is already being
 * run: the wait cannot deadlock.
 */

/* Panels per item: about KT_ITEMS_PER_WORKER items per worker, each at most KT_ITEM_MAX_BYTES
 * of weights, from 1 to max_panels panels of `panel_bytes`. */
static int32_t panels_for_items(int64_t total_bytes, int64_t panel_bytes, int32_t max_panels, int32_t nw) {
    if (panel_bytes <= 0) return max_panels;
    int64_t per = total_bytes / ((int64_t)KT_ITEMS_PER_WORKER * (nw > 0 ? nw : 1)) / panel_bytes;
    if (per > KT_ITEM_MAX_BYTES / panel_bytes) per = KT_ITEM_MAX_BYTES / panel_bytes;
    if (per > max_panels) per = max_panels;
    return per < 1 ? 1 : (int32_t)per;
}

/* Sets the job up for one phase when it qualifies; returns 0 (job untouched but for routing
 * scratch) when the phased path must run it. */
static int prepare_one_phase(kt_job *j) {
    kt_moe *m = j->moe;
    kt_ws *w = &j->ws;
    const int32_t T = j->T, H = m->d.hidden, I = m->d.inter;
    if (T > m->decode_tokens) return 0;
    const int bad = route_pairs(j, 1);
    const int32_t na = j->n_active;
    for (int32_t a = 0; a < na; a++)
        if (j->ops->gemm_amx && w->active[3 * a + 2] >= j->use_amx_min) return 0;
    if (bad) j->prep_status |= KT_E_IDS;
    j->ops->quantize(&m->fmt, H, m->gate.group, j->x, j->x_dtype, H, w->xq, w->xrow, w->xs, w->xsum,
                     m->gate.ngroups, T);
    const int32_t npI = I / KT_PANEL, npH = H / KT_PANEL;
    const int64_t gu_panel = m->gate.w_panel + m->up.w_panel, down_step = (int64_t)na * m->down.w_panel;
    /* gate_up_panels' row chunks hold at least 16 rows up to KT_MCH / 16 panels */
    j->ppi_I = panels_for_items((int64_t)na * npI * gu_panel, gu_panel, min32(npI, KT_MCH / KT_PANEL), j->nw);
    j->ppi_H = panels_for_items((int64_t)npH * down_step, down_step, npH, j->nw);
    const int32_t per = ceil_div(npI, j->ppi_I);
    for (int32_t a = 0; a < na; a++) atomic_store_explicit(&w->gu_left[a], per, memory_order_relaxed);
    j->n_gu_items = na * per;
    j->n_items[0] = j->n_gu_items + ceil_div(npH, j->ppi_H);
    j->n_phases = 1;
    j->one_phase = 1;
    return 1;
}

/* Down item d: H panels [p0, p0 + np) of every active expert's rows into ypair, then those
 * columns of y = sum over each token's pairs of w * ypair, by the same reduce as the phases
 * (k order, one fma per term): a token's output does not depend on the path or the batch. */
static void down_all_experts(kt_job *j, int32_t d) {
    kt_moe *m = j->moe;
    kt_ws *w = &j->ws;
    const int32_t H = m->d.hidden, p0 = d * j->ppi_H, np = min32(H / KT_PANEL - p0, j->ppi_H);
    const kt_act A = {w->hq, w->hrow, w->hs, w->hsum, m->down.ngroups};
    const int32_t na = j->n_active;
    int32_t first = 0; /* experts before `first` are done here; after it, done[a] says */
    uint8_t done[na > 0 ? na : 1]; /* na <= T * K, T <= KT_DECODE_TOKENS_MAX */
    memset(done, 0, sizeof done);
    unsigned spins = 0;
    while (first < na) {
        int32_t ran = 0;
        for (int32_t a = first; a < na; a++) {
            if (done[a] || atomic_load_explicit(&w->gu_left[a], memory_order_acquire) >= 0) continue;
            const int32_t slot = w->active[3 * a], off = w->active[3 * a + 1], cnt = w->active[3 * a + 2];
            j->ops->gemm(&m->fmt, &m->down, slot, p0, np, &A, off, cnt, w->ypair + (int64_t)off * H + p0 * KT_PANEL,
                         H);
            done[a] = 1;
            ran = 1;
        }
        while (first < na && done[first]) first++;
        if (!ran && first < na) {
            __builtin_ia32_pause();
            if (++spins % 4096 == 0) sched_yield(); /* an oversubscribed host must not livelock */
        }
    }
    j->ops->reduce(j->y, j->y_dtype, H, w->ypair, w->tk_row, j->w, j->K, 0, j->T, p0 * KT_PANEL,
                   (p0 + np) * KT_PANEL);
}

static void one_phase_item(kt_job *j, int32_t item, int32_t worker) {
    kt_ws *w = &j->ws;
    if (item >= j->n_gu_items) {
        down_all_experts(j, item - j->n_gu_items);
        return;
    }
    const kt_act A = {w->xq, w->xrow, w->xs, w->xsum, j->moe->gate.ngroups, w->pair_token};
    const int32_t a = gate_up_item(j, &A, item, worker);
    if (atomic_fetch_sub_explicit(&w->gu_left[a], 1, memory_order_acq_rel) == 1) { /* the expert's last */
        const int32_t off = w->active[3 * a + 1];
        if ((uint8_t *)w->h != w->hq) quantize_h_rows(j, off, off + w->active[3 * a + 2]);
        atomic_store_explicit(&w->gu_left[a], -1, memory_order_release); /* ready for down */
    }
}

static void bench_item(kt_job *j, int32_t item) {
    if (j->kind == KT_JOB_BENCH_PEAK) {
        atomic_fetch_add(&j->bench_ops, j->ops->peak_int8(j->bench_iters));
        return;
    }
    const int64_t share = j->bench_bytes / j->nw / 64 * 64;
    static volatile uint64_t sink;
    sink ^= j->ops->read_sum(j->bench_p + item * share, share);
}

void kt_job_item(kt_job *j, int32_t phase, int32_t item, int32_t worker) {
    if (j->kind == KT_JOB_LINEAR) {
        kt_linear_item(j, phase, item, worker);
        return;
    }
    if (j->kind != KT_JOB_MOE) {
        bench_item(j, item);
        return;
    }
    if (j->moe->n_parts) { /* the sum of the parts' partial outputs, in part order */
        const kt_moe *m = j->moe;
        const int32_t t0 = item * KT_TCH, t1 = min32(j->T, t0 + KT_TCH);
        j->ops->reduce(j->y, j->y_dtype, m->d.hidden, m->partial, m->sum_rows, m->ones, m->n_parts, t0, t1, 0,
                       m->d.hidden);
        return;
    }
    if (j->one_phase) {
        one_phase_item(j, item, worker);
        return;
    }
    switch (phase) {
    case KT_PH_ROUTE_QUANT:
        if (item == 0)
            route(j);
        else
            quantize_x(j, item);
        break;
    case KT_PH_GATHER: gather_x(j, item); break;
    case KT_PH_GATE_UP: gate_up(j, item, worker); break;
    case KT_PH_QUANT_H: quantize_h(j, item); break;
    case KT_PH_DOWN: down(j, item, worker); break;
    case KT_PH_REDUCE: {
        const int32_t t0 = item * KT_TCH, t1 = min32(j->T, t0 + KT_TCH);
        j->ops->reduce(j->y, j->y_dtype, j->moe->d.hidden, j->ws.ypair, j->ws.tk_row, j->w, j->K, t0, t1, 0,
                       j->moe->d.hidden);
        break;
    }
    default: break;
    }
}

/* ------------------------------------------------------------------ public job API */

int kt_submit(kt_job *job) {
    kt_init();
    return kt_pool_submit_job(job);
}

int kt_wait(kt_job *job) { return kt_pool_wait_job(job); }

int kt_run(kt_job *job) {
    const int s = kt_submit(job);
    return s != KT_OK ? s : kt_wait(job);
}

_Atomic int32_t kt_prefetch_bytes = 0;

void kt_set_prefetch(int32_t bytes) { atomic_store(&kt_prefetch_bytes, bytes < 0 ? 0 : bytes / 64 * 64); }

int32_t kt_get_prefetch(void) { return atomic_load(&kt_prefetch_bytes); }

void kt_host_submit(void *job) { (void)kt_submit((kt_job *)job); }

void kt_host_wait(void *job) { (void)kt_wait((kt_job *)job); }

double kt_pool_bench(int32_t kind, const void *p, int64_t bytes, int64_t iters, int32_t n_threads, int64_t *ops) {
    if (kind != KT_JOB_BENCH_READ && kind != KT_JOB_BENCH_PEAK) return -1.0;
    kt_job *job = kt_job_create();
    job->kind = kind;
    job->bench_p = p;
    job->bench_bytes = bytes;
    job->bench_iters = iters;
    job->n_threads = n_threads;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const int status = kt_run(job);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (ops) *ops = atomic_load(&job->bench_ops);
    kt_job_destroy(job);
    if (status != KT_OK) return -1.0;
    return (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
}
