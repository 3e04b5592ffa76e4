/* Dense linear layers (lm_head, dense MLPs on CPU-only hosts): y = x W^T + b with W packed
 * exactly like one expert's matrix, computed by the same per-ISA kernels (quantize, gemm,
 * gemm_amx) on the shared pool. A forward is a job of two phases:
 *
 *   KT_LPH_QUANT  x rows -> the kernels' activation format (one more item zeroes the rows
 *                 that pad T to a multiple of 16 for the AMX tiles);
 *   KT_LPH_GEMM   (block of up to KT_LROWS rows, run of panels): the panels' outputs for the
 *                 rows into per-worker scratch, then + bias and stored as y's dtype.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kt_job.h"

#define KT_LROWS 256 /* rows of one gemm item */
#define KT_LQCH 4    /* rows per quantise item */
#define KT_LPPI 8    /* most panels per gemm item */

struct kt_linear {
    kt_fmt fmt;
    kt_mat W;
    int32_t out_features;
    const float *bias;
    int32_t amx_min_rows;
    uint8_t *ws;
    size_t ws_bytes;
};

static int32_t lceil(int32_t a, int32_t b) { return (a + b - 1) / b; }
static int32_t lmin(int32_t a, int32_t b) { return a < b ? a : b; }

kt_linear *kt_linear_create(const kt_dense *d, char *err, int32_t err_len) {
    char dummy[8];
    if (!err || err_len <= 0) err = dummy, err_len = sizeof dummy;
    err[0] = 0;
    const kt_matrix *src = &d->weight;
    const int32_t n = src->n, k = src->k;
    if (d->format != KT_FMT_BF16 && d->format != KT_FMT_INT8 && d->format != KT_FMT_INT4) {
        snprintf(err, err_len, "unknown format %d", d->format);
        return NULL;
    }
    if (n <= 0 || n % KT_PANEL || k <= 0 || k % 32) {
        snprintf(err, err_len, "weight [%d, %d]: rows must be a multiple of 16 and columns of 32", n, k);
        return NULL;
    }
    if (d->out_features <= n - KT_PANEL || d->out_features > n) {
        snprintf(err, err_len, "out_features %d does not fit %d packed rows", d->out_features, n);
        return NULL;
    }
    const int32_t group = d->format == KT_FMT_BF16 ? k : (d->group == 0 ? k : d->group);
    if (group <= 0 || group % 32 || k % group) {
        snprintf(err, err_len, "group %d must be a multiple of 32 dividing %d", group, k);
        return NULL;
    }
    if (!src->w || (d->format != KT_FMT_BF16 && !src->scale) ||
        (d->format == KT_FMT_INT4 && !d->symmetric && !src->zmin)) {
        snprintf(err, err_len, "missing packed weights, scales or mins");
        return NULL;
    }
    kt_linear *lin = calloc(1, sizeof *lin);
    lin->fmt.format = d->format;
    lin->fmt.scale_f32 = d->scale_f32 ? 1 : 0;
    lin->fmt.zero = d->format == KT_FMT_INT8 ? 128 : (d->format == KT_FMT_INT4 && d->symmetric ? 8 : 0);
    lin->fmt.has_min = d->format == KT_FMT_INT4 && !d->symmetric;
    kt_mat *W = &lin->W;
    W->w = src->w;
    W->scale = d->format == KT_FMT_BF16 ? NULL : src->scale;
    W->zmin = lin->fmt.has_min ? src->zmin : NULL;
    W->n = n, W->k = k, W->group = group, W->ngroups = k / group;
    W->w_panel = kt_matrix_weight_bytes(d->format, KT_PANEL, k);
    W->w_slot = W->w_panel * (n / KT_PANEL);
    W->s_panel = d->format == KT_FMT_BF16 ? 0 : (int64_t)KT_PANEL * W->ngroups * (d->scale_f32 ? 4 : 2);
    W->s_slot = W->s_panel * (n / KT_PANEL);
    lin->out_features = d->out_features;
    lin->bias = d->bias;
    const char *env = getenv("KT_AMX_MIN_ROWS");
    lin->amx_min_rows = env && atoi(env) > 0 ? atoi(env) : 9;
    return lin;
}

void kt_linear_destroy(kt_linear *lin) {
    if (!lin) return;
    free(lin->ws);
    free(lin);
}

/* Workspace for T rows: activations (T padded to 16) and per-worker output scratch. */
static size_t lin_layout(const kt_linear *lin, int32_t T, int32_t threads, uint8_t *base, kt_ws *ws) {
    const int32_t k = lin->W.k, ng = lin->W.ngroups, rows = (int32_t)kt_round_up(T, KT_PANEL);
    const int32_t elem = lin->fmt.format == KT_FMT_BF16 ? 4 : 1; /* widest activation element of any ISA */
    size_t off = 0;
#define KT_LTAKE(field, type, count)                                                     \
    do {                                                                                 \
        ws->field = (type *)(base ? base + off : NULL);                                  \
        off += (size_t)kt_round_up((int64_t)(count) * (int64_t)sizeof(type), KT_ALIGN); \
    } while (0)
    memset(ws, 0, sizeof *ws);
    ws->rmax = rows;
    ws->xrow = kt_round_up((int64_t)k * elem, KT_ALIGN);
    ws->scratch_bytes = kt_round_up((int64_t)KT_LROWS * KT_LPPI * KT_PANEL * 4 + kt_amx_scratch_bytes(k), KT_ALIGN);
    KT_LTAKE(xq, uint8_t, (int64_t)rows * ws->xrow);
    KT_LTAKE(xs, float, (int64_t)rows * ng);
    KT_LTAKE(xsum, int32_t, (int64_t)rows * ng);
    KT_LTAKE(scratch, uint8_t, (int64_t)threads * ws->scratch_bytes);
#undef KT_LTAKE
    return off;
}

int kt_linear_reserve(kt_linear *lin, int32_t T) {
    if (!lin || T < 0) return -1;
    kt_ws probe;
    const int n = kt_pool_size();
    const size_t need = lin_layout(lin, T, n > 0 ? n : 1, NULL, &probe);
    if (need <= lin->ws_bytes) return 0;
    void *p = NULL;
    if (posix_memalign(&p, 4096, need) != 0) return -1;
    free(lin->ws);
    lin->ws = p;
    lin->ws_bytes = need;
    return 0;
}

int kt_linear_set(kt_job *job, kt_linear *lin, int32_t T, const void *x, int32_t x_dtype, void *y,
                  int32_t n_threads) {
    if (!job || !lin || T < 0 || (x_dtype != KT_DT_F32 && x_dtype != KT_DT_BF16)) return -1;
    if (T > 0 && (!x || !y)) return -1;
    job->kind = KT_JOB_LINEAR;
    job->lin = lin;
    job->moe = NULL;
    job->T = T, job->K = 1;
    job->x = x, job->x_dtype = x_dtype;
    job->y = y, job->y_dtype = x_dtype;
    job->n_threads = n_threads;
    job->is_set = 1;
    return 0;
}

int kt_linear_prepare(kt_job *job, int32_t pool_threads) {
    if (!job->is_set || !job->lin) return KT_E_NOT_SET;
    kt_linear *lin = job->lin;
    const size_t need = lin_layout(lin, job->T, pool_threads, lin->ws, &job->ws);
    if (need > lin->ws_bytes || (!lin->ws && job->T > 0)) return KT_E_WORKSPACE;
    job->nw = job->n_threads > 0 && job->n_threads < pool_threads ? job->n_threads : pool_threads;
    job->wmap = NULL;
    job->n_phases = KT_LPH_COUNT;
    job->use_amx_min = lin->amx_min_rows;
    memset(job->n_items, 0, sizeof job->n_items);
    if (job->T == 0) return KT_OK;
    const int32_t npanels = lin->W.n / KT_PANEL, blocks = lceil(job->T, KT_LROWS);
    /* about 8 items per worker, at most KT_LPPI panels each (the scratch holds that many) */
    int32_t ppi = (int32_t)((int64_t)npanels * blocks / (8 * (int64_t)job->nw));
    ppi = ppi < 1 ? 1 : (ppi > KT_LPPI ? KT_LPPI : ppi);
    job->ppi_I = ppi;
    job->n_items[KT_LPH_QUANT] = lceil(job->T, KT_LQCH) + 1;
    job->n_items[KT_LPH_GEMM] = blocks * lceil(npanels, ppi);
    return KT_OK;
}

static void lin_quantize(kt_job *j, int32_t item) {
    kt_linear *lin = j->lin;
    kt_ws *w = &j->ws;
    const int32_t k = lin->W.k, ng = lin->W.ngroups, nq = lceil(j->T, KT_LQCH);
    if (item == nq) { /* zero rows T .. rmax-1 (the AMX tiles read whole 16-row blocks) */
        const int32_t pad = w->rmax - j->T;
        memset(w->xq + (int64_t)j->T * w->xrow, 0, (size_t)pad * (size_t)w->xrow);
        memset(w->xs + (int64_t)j->T * ng, 0, sizeof(float) * (size_t)pad * ng);
        memset(w->xsum + (int64_t)j->T * ng, 0, sizeof(int32_t) * (size_t)pad * ng);
        return;
    }
    const int32_t t0 = item * KT_LQCH, t1 = lmin(j->T, t0 + KT_LQCH);
    const int64_t esz = j->x_dtype == KT_DT_F32 ? 4 : 2;
    j->ops->quantize(&lin->fmt, k, lin->W.group, (const uint8_t *)j->x + (int64_t)t0 * k * esz, j->x_dtype, k,
                     w->xq + t0 * w->xrow, w->xrow, w->xs + (int64_t)t0 * ng, w->xsum + (int64_t)t0 * ng, ng,
                     t1 - t0);
}

static void lin_gemm(kt_job *j, int32_t item, int32_t worker) {
    kt_linear *lin = j->lin;
    kt_ws *w = &j->ws;
    const kt_isa_ops *ops = j->ops;
    const int32_t npanels = lin->W.n / KT_PANEL, per = lceil(npanels, j->ppi_I);
    const int32_t r0 = (item / per) * KT_LROWS, mc = lmin(KT_LROWS, j->T - r0);
    const int32_t p0 = (item % per) * j->ppi_I, np = lmin(j->ppi_I, npanels - p0);
    const kt_act A = {w->xq, w->xrow, w->xs, w->xsum, lin->W.ngroups};
    uint8_t *scratch = w->scratch + (int64_t)worker * w->scratch_bytes;
    float *out = (float *)scratch; /* [KT_LROWS][np * 16] */
    const int64_t ldo = (int64_t)np * KT_PANEL;
    if (ops->gemm_amx && mc >= j->use_amx_min) {
        uint8_t *amx_scratch = scratch + (int64_t)KT_LROWS * KT_LPPI * KT_PANEL * 4;
        ops->gemm_amx(&lin->fmt, &lin->W, 0, p0, np, &A, r0, (int32_t)kt_round_up(mc, KT_PANEL), out, ldo,
                      amx_scratch);
    } else {
        ops->gemm(&lin->fmt, &lin->W, 0, p0, np, &A, r0, mc, out, ldo);
    }
    const int32_t c0 = p0 * KT_PANEL, cols = lmin(np * KT_PANEL, lin->out_features - c0);
    if (cols <= 0) return;
    const int64_t esz = j->y_dtype == KT_DT_F32 ? 4 : 2, N = lin->out_features;
    ops->store_rows((uint8_t *)j->y + ((int64_t)r0 * N + c0) * esz, j->y_dtype, N, out, ldo,
                    lin->bias ? lin->bias + c0 : NULL, mc, cols);
}

void kt_linear_item(kt_job *j, int32_t phase, int32_t item, int32_t worker) {
    if (phase == KT_LPH_QUANT)
        lin_quantize(j, item);
    else if (phase == KT_LPH_GEMM)
        lin_gemm(j, item, worker);
}
