/* A job: one forward of one layer, run by the pool as a sequence of phases separated by
 * barriers. Within a phase the participating workers take items from an atomic counter.
 * Item counts of later phases are written by earlier phases (routing decides them).
 *
 * Decode (a few tokens, every expert on the vector kernels) runs as one phase instead: the
 * submitting thread routes and quantises x while preparing; the items are all gate/up items,
 * then all down items (see moe.c "one-phase decode"). */
#ifndef KT_JOB_H
#define KT_JOB_H

#include <stdatomic.h>

#include "kt_internal.h"

enum {
    KT_PH_ROUTE_QUANT = 0, /* item 0 routes the (token, k) pairs; others quantise x rows */
    KT_PH_GATHER,          /* x rows copied into expert-sorted, 16-padded row order */
    KT_PH_GATE_UP,         /* (expert, I panel): h = act(gate x) * (up x) */
    KT_PH_QUANT_H,         /* h rows to the kernels' activation format */
    KT_PH_DOWN,            /* (expert, H panel): ypair = down h */
    KT_PH_REDUCE,          /* y[t] = sum_k w * ypair */
    KT_NUM_PHASES
};

/* Status bits of a job. */
enum { KT_OK = 0, KT_E_NOT_SET = 1, KT_E_IDS = 2, KT_E_NO_POOL = 4, KT_E_NO_ISA = 8, KT_E_WORKSPACE = 16 };

/* Addresses inside the layer's workspace for this job's T and K. */
typedef struct {
    int32_t *tk_row;      /* [T*K] padded row of each pair, -1 = adds nothing */
    int32_t *counts;      /* [n_slots] */
    int32_t *fill;        /* [n_slots] */
    int32_t *row_off;     /* [n_slots] */
    int32_t *active;      /* [3 * n_active]: slot, first row, count */
    int32_t *pair_token;  /* [rmax] token of a row, -1 for padding rows */
    uint8_t *xq;          /* [T][xrow] */
    float *xs;            /* [T][gx] activation scale per weight group */
    int32_t *xsum;        /* [T][gx] */
    uint8_t *xa;          /* [rmax][xrow] */
    float *xas;
    int32_t *xasum;
    float *h;             /* [rmax][I] */
    uint8_t *hq;          /* [rmax][hrow] */
    float *hs;
    int32_t *hsum;
    float *ypair;         /* [rmax][H] */
    _Atomic int32_t *gu_left; /* [n_slots] gate/up items left of an active expert; -1: h ready */
    uint8_t *scratch;     /* [threads][scratch_bytes] */
    int64_t xrow, hrow, scratch_bytes;
    int32_t rmax;
} kt_ws;

enum { KT_JOB_MOE = 0, KT_JOB_BENCH_READ = 1, KT_JOB_BENCH_PEAK = 2, KT_JOB_FOR = 3, KT_JOB_LINEAR = 4 };

/* Phases of a linear job (linear.c). */
enum { KT_LPH_QUANT = 0, KT_LPH_GEMM, KT_LPH_COUNT };

struct kt_job {
    int32_t kind;          /* KT_JOB_* */
    /* benchmark jobs: one item per worker */
    const uint8_t *bench_p;
    int64_t bench_bytes, bench_iters;
    _Atomic int64_t bench_ops;
    /* parallel-for jobs (kt_pool_parallel_for, kt_numa_copy): items from for_next */
    kt_task_fn for_fn;
    void *for_ctx;
    int64_t for_items;
    _Atomic int64_t for_next;
    /* arguments (kt_job_set / kt_linear_set) */
    kt_moe *moe;
    struct kt_linear *lin;
    int32_t T, K;
    const void *x;
    int32_t x_dtype;
    const void *ids;
    int32_t ids_int64;
    const float *w;
    void *y;
    int32_t n_threads;
    int32_t y_dtype;       /* KT_DT_* of y (fp32 for the partial sums of a layer of parts) */
    int32_t part_id, part_n; /* mirror parts: compute only the active experts of rank % part_n == part_id */
    int32_t is_set;
    /* fixed at submit */
    const kt_isa_ops *ops;
    kt_ws ws;
    int32_t nw;            /* participating workers */
    const int32_t *wmap;   /* [pool size]: a worker's index in this job, -1 = not taking part;
                            * NULL = the first nw workers */
    int32_t n_phases;      /* phases run (KT_NUM_PHASES for a layer, 1 for the others) */
    /* a layer of NUMA parts: one sub-job per part, run before this job's own phase 0 */
    int32_t n_subs;
    struct kt_job **subs;
    int32_t *sub_wmap;     /* [n_subs][pool size] */
    int32_t n_rows;        /* padded rows in use (routing) */
    int32_t n_active;      /* experts with at least one pair */
    int32_t use_amx_min;   /* rows from which an expert runs on AMX tiles */
    int32_t ppi_I, ppi_H;  /* panels per gate/up and per down item */
    int32_t one_phase;     /* decode: gate/up items then down items in one phase */
    int32_t n_gu_items;    /* one_phase: items below this are gate/up items */
    int32_t prep_status;   /* status found while preparing (bad ids), kept when a run starts */
    int32_t n_items[KT_NUM_PHASES];
    _Atomic int32_t next[KT_NUM_PHASES];
    _Atomic int32_t bar_count;
    _Atomic int32_t bar_gen;
    _Atomic int32_t finished;
    _Atomic int32_t done;
    _Atomic int32_t status;
    int32_t submitted;
};

/* moe.c: prepares a submitted job (workspace addresses, phase 0 items). Returns a status.
 * Sub-jobs of a layer of parts are prepared here too. */
int kt_job_prepare(kt_job *job, int32_t pool_threads);
/* moe.c: resets what a run counts (item counters, barrier, status) before it starts. */
void kt_job_reset_run(kt_job *job);
/* moe.c: one item of one phase. */
void kt_job_item(kt_job *job, int32_t phase, int32_t item, int32_t worker);
/* linear.c */
int kt_linear_prepare(kt_job *job, int32_t pool_threads);
void kt_linear_item(kt_job *job, int32_t phase, int32_t item, int32_t worker);

#endif
