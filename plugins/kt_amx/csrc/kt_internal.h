/* kt_amx internals shared by the dispatch code and the per-ISA kernels.
 *
 * Packed layouts (one expert, one matrix W[n][k]; n is a multiple of 16, k of the group):
 *
 *   W is cut into panels of 16 consecutive output rows; panel p holds rows 16p..16p+15.
 *   Inside a panel the 16 rows are interleaved so that one 64-byte vector holds the same
 *   few k of all 16 rows -- the layout of an AMX B tile and of a vpdpbusd/vdpbf16ps operand
 *   when the activation is broadcast:
 *
 *   bf16 : [k/2][16][2]  bf16            (vector j = k 2j, 2j+1 of rows 0..15)
 *   int8 : [k/4][16][4]  u8 = q + 128    (vector j = k 4j..4j+3), groups contiguous
 *   int4 : [k/8][16][4]  u8 nibbles      byte b of row r in vector j holds q[r][8j+b] in its
 *                                        low nibble and q[r][8j+4+b] in its high nibble
 *
 *   Scales (and mins) of int8/int4: [n/16][k/group][16] fp16 or fp32 per expert.
 *   Dequantised value of a weight: int8  s*(u - 128);  int4 symmetric  s*(u - 8);
 *   int4 affine  s*u + m.
 *
 * Activations of int formats are quantised to int8 per weight group g (an fp32 scale xs_g and
 * the int32 sum of the codes), so  sum_k w*x = sum_g xs_g*(s_g*(dot_g(u, q) - z*sum_g(q)) + m_g*sum_g(q)).
 */
#ifndef KT_INTERNAL_H
#define KT_INTERNAL_H

#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>

#include "kt_amx_api.h"

#define KT_PANEL 16
#define KT_ALIGN 64

/* A packed matrix with the strides derived from its shape. */
typedef struct {
    const uint8_t *w;
    const uint8_t *scale;
    const uint8_t *zmin;
    int64_t w_panel;   /* bytes of one panel's weights */
    int64_t w_slot;    /* bytes of one expert's weights */
    int64_t s_panel;   /* bytes of one panel's scales (and of its mins) */
    int64_t s_slot;
    int32_t n, k, group, ngroups;
} kt_mat;

/* How to read int weights: format, scale type, implicit zero point, explicit mins. */
typedef struct {
    int32_t format;
    int32_t scale_f32;
    int32_t zero;      /* 128 (int8), 8 (symmetric int4), 0 (affine int4) */
    int32_t has_min;
} kt_fmt;

/* Rows of activations in the kernels' format (see kt_act_elem_bytes). */
typedef struct {
    const uint8_t *data;
    int64_t stride;        /* bytes between rows */
    const float *scale;    /* [rows][gstride] int formats only */
    const int32_t *gsum;   /* [rows][gstride] int formats only */
    int32_t gstride;
    const int32_t *rows;   /* NULL: kernel row r reads row r; else row rows[r] (vector kernels
                            * only: gemm_amx needs NULL). Spares copying token rows per expert. */
} kt_act;

/* The stored row that kernel row r of A reads. */
static inline int64_t kt_act_row(const kt_act *A, int32_t r) { return A->rows ? A->rows[r] : r; }

/* Per-ISA kernels; one table per compiled variant (kernels.c). */
typedef struct {
    int level;
    /* Activation rows for `fmt`: bf16 format -> bf16 (AVX-512) or fp32 (AVX2) rows;
     * int formats -> int8 rows + scale + group sums. src rows are fp32 or bf16. */
    void (*quantize)(const kt_fmt *fmt, int32_t k, int32_t group, const void *src, int32_t src_dtype,
                     int64_t src_stride, uint8_t *dst, int64_t dst_stride, float *scale,
                     int32_t *gsum, int32_t gstride, int32_t rows);
    /* out[m][16*i + c] (m < M, i < npanels) = sum_k W[16*(panel0+i) + c][k] * A[row0 + m][k]. */
    void (*gemm)(const kt_fmt *fmt, const kt_mat *W, int32_t slot, int32_t panel0, int32_t npanels,
                 const kt_act *A, int32_t row0, int32_t M, float *out, int64_t ldo);
    /* The same on AMX tiles; M must be a multiple of 16 (rows past the real ones are zero).
     * scratch: kt_amx_scratch_bytes(k) bytes, 64-aligned. NULL below the AMX level. */
    void (*gemm_amx)(const kt_fmt *fmt, const kt_mat *W, int32_t slot, int32_t panel0, int32_t npanels,
                     const kt_act *A, int32_t row0, int32_t M, float *out, int64_t ldo, uint8_t *scratch);
    /* h[r][c] = act(g[r][c]) * u[r][c] for r < rows, c < cols (cols a multiple of 16). */
    void (*act_mul)(int32_t act, float *h, int64_t ldh, const float *g, const float *u, int64_t ldgu,
                    int32_t rows, int32_t cols);
    /* y[t][c] = sum_k w[t][k] * ypair[row[t][k]][c] (rows < 0 skipped, k in order, one fma
     * per term) for t0 <= t < t1 and columns c0 <= c < c1 (multiples of 16), written as
     * y_dtype; y and ypair rows are H apart. Each element's sum is the same whatever the
     * column range, so column slices of a forward add up exactly like the whole. */
    void (*reduce)(void *y, int32_t y_dtype, int32_t H, const float *ypair, const int32_t *tk_row,
                   const float *w, int32_t K, int32_t t0, int32_t t1, int32_t c0, int32_t c1);
    /* y[r][c] = src[r][c] (+ bias[c]) for r < rows, c < cols (any cols; src rows hold at least
     * cols rounded up to 16), stored as y_dtype with rows ldy elements apart. */
    void (*store_rows)(void *y, int32_t y_dtype, int64_t ldy, const float *src, int64_t lds, const float *bias,
                       int32_t rows, int32_t cols);
    /* Releases this thread's tile state (AMX); NULL elsewhere. */
    void (*tile_release)(void);
    /* Benchmarks: XOR of n bytes read with the widest loads (n a multiple of 64), and `iters`
     * rounds of the level's int8 dot-product instruction on independent accumulators
     * (returns the int8 operations done: 2 per multiply-add). */
    uint64_t (*read_sum)(const uint8_t *p, int64_t n);
    int64_t (*peak_int8)(int64_t iters);
} kt_isa_ops;

extern const kt_isa_ops kt_ops_avx2;
extern const kt_isa_ops kt_ops_avx512;
extern const kt_isa_ops kt_ops_amx;
extern const int kt_amx_emulated_build;   /* defined by the AMX variant */
/* Bytes ahead of the current one that the one-token int kernels prefetch into L1 from the
 * weight stream (0 = none; kt_set_prefetch, moe.c). */
extern _Atomic int32_t kt_prefetch_bytes;
/* pool.c: CLOCK_MONOTONIC in ns; pins the calling thread to one CPU (cpu < 0: no-op). */
int64_t kt_now_ns(void);
void kt_pin_thread(int cpu);

/* Selected ISA (cpu_detect.c). */
const kt_isa_ops *kt_isa_ops_selected(void);

/* Bytes per activation element for a format at a level (int8 rows: 1). */
static inline int kt_act_elem_bytes(int format, int level) {
    if (format != KT_FMT_BF16) return 1;
    return level >= KT_ISA_AVX512 ? 2 : 4;
}

static inline int64_t kt_round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

/* Per-thread scratch of gemm_amx: an unpacked int4 panel (k*16 bytes) + C tiles + fp32 sums. */
static inline int64_t kt_amx_scratch_bytes(int32_t k) { return (int64_t)k * 16 + 4 * 1024 + 64 * 64 + 64; }

/* Thread pool (pool.c) used by kt_submit / kt_wait (moe.c). */
int kt_pool_submit_job(kt_job *job);
int kt_pool_wait_job(kt_job *job);
void kt_pool_forget_job(kt_job *job);
/* Blocking parallel-for on the workers of wmap ([pool size] -> index, -1 = not taking part;
 * NULL = the first nw workers). */
int kt_pool_run_for(kt_task_fn fn, void *ctx, int64_t n_items, const int32_t *wmap, int32_t nw);

#endif
