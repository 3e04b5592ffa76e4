/* The matmul kernels, one source compiled once per ISA level:
 *   -DKTL_ISA=0  scalar (baseline x86-64 / any CPU)           -> ktl_kernels_scalar
 *   -DKTL_ISA=1  -mavx2 -mfma -mf16c                           -> ktl_kernels_avx2
 *   -DKTL_ISA=2  + -mavx512f -mavx512bw -mavx512vl -mavx512vnni -> ktl_kernels_avx512
 * cpu.c picks one table at run time. Only the table of the ISA the CPU has is ever called.
 *
 * Structure (tinyBLAS style): for each weight type a `tile` computes an RM x RN block of
 * outputs (RM weight rows x RN tokens) with RM*RN vector accumulators, decoding each weight
 * block once and using it for the RN tokens. The driver below walks a row range in tiles, token
 * block by token block (so the token rows of a block stay in L2), and stores the results. The
 * per-ISA type code is in kern_scalar.h, kern_avx2.h and kern_avx512.h.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ktl_internal.h"

#ifndef KTL_ISA
#error "compile with -DKTL_ISA=0|1|2"
#endif

#define KTL_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ tile driver */

/* Rows per tile when there is one token (GEMV) and the type has no gemv_<name> kernel (AVX-512
 * has them for Q4_0..Q8_0, Q4_K, Q6_K; they walk rows one at a time): 1 walks the weights as one
 * sequential stream. Measured on Zen 4 (2 threads, DRAM-resident 7168x2048 sets): interleaving
 * 4 rows, with or without software prefetch, reads the weights markedly slower. Tuning:
 * -DKTL_GEMV_RM=4. */
#ifndef KTL_GEMV_RM
#define KTL_GEMV_RM 1
#endif

/* GEMV with an activation row longer than this many bytes sums the rows in parts (multiples of
 * 512 values), so that the part of the activation row being read could stay in L1. Off (0) by
 * default: on Zen 4 the strided walk over the weights this makes was measured 1.5-3x slower
 * than one sequential pass. Tuning: -DKTL_GEMV_ACT_BYTES=16384. */
#ifndef KTL_GEMV_ACT_BYTES
#define KTL_GEMV_ACT_BYTES 0
#endif

static int64_t k_chunk(const ktl_gemm_args *a) {
    if (KTL_GEMV_ACT_BYTES <= 0 || a->ntok != 1 || a->lay.stride <= KTL_GEMV_ACT_BYTES) return a->k;
    int64_t kc = (int64_t)((double)KTL_GEMV_ACT_BYTES * (double)a->k / (double)a->lay.stride) & ~(int64_t)511;
    return kc < 512 ? 512 : kc;
}

/* Token blocks: as many token rows as fit in about 1 MiB, a multiple of 4. */
static int64_t token_block(const ktl_gemm_args *a) {
    int64_t tb = ((int64_t)1 << 20) / (a->lay.stride > 0 ? a->lay.stride : 1);
    tb &= ~(int64_t)3;
    if (tb < 4) tb = 4;
    return tb;
}

KTL_INLINE const uint8_t *act_row(const ktl_gemm_args *a, int64_t j) {
    return a->act + (a->tok ? (int64_t)a->tok[j] : j) * a->lay.stride;
}

KTL_INLINE void store_tile(const ktl_gemm_args *a, int64_t r, int64_t j0, int rm, int rn, const float *c, int ldc) {
    for (int j = 0; j < rn; j++) {
        int64_t t = j0 + j;
        float *o = a->out + (a->orow ? (int64_t)a->orow[t] : t) * a->out_stride + r;
        float alpha = a->alpha ? a->alpha[t] : 1.0f;
        for (int i = 0; i < rm; i++) {
            float v = c[i * ldc + j];
            if (a->alpha) v *= alpha;
            if (a->accumulate) o[i] += v;
            else o[i] = v;
        }
    }
}

/* Defines tiled_<name>(args, r0, r1) from an always-inline
 *     tile_<name>(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, int rm, int rn, float *c)
 * computing c[i*RN_MAX + j] = dot(row w + i*row_bytes, token row x[j]) for i < rm, j < rn,
 * over the values [a->k0, a->k1) of the rows, called only with (rm, rn) in {RM_MAX, 1} x
 * {RN_MAX, 4 (when RN_MAX > 4), 2, 1} so that each instance unrolls. */
#define DEFINE_TILED(name, RM_MAX, RN_MAX)                                                         \
    static void tiled_##name(const ktl_gemm_args *args, int64_t r0, int64_t r1) {                  \
        ktl_gemm_args part = *args;                                                                \
        const ktl_gemm_args *a = &part;                                                            \
        int64_t kc = k_chunk(args);                                                                \
        int64_t tb = token_block(a);                                                               \
        for (part.k0 = 0; part.k0 < args->k; part.k0 += kc) {                                      \
            part.k1 = part.k0 + kc < args->k ? part.k0 + kc : args->k;                             \
            part.accumulate = args->accumulate || part.k0 > 0;                                     \
            for (int64_t t0 = 0; t0 < a->ntok; t0 += tb) {                                         \
                int64_t t1 = t0 + tb < a->ntok ? t0 + tb : a->ntok;                                 \
                for (int64_t r = r0; r < r1;) {                                                    \
                    int rm = r1 - r >= RM_MAX && (a->ntok > 1 || KTL_GEMV_RM > 1) ? RM_MAX : 1;     \
                    const uint8_t *w = a->w + r * a->row_bytes;                                    \
                    for (int64_t j = t0; j < t1;) {                                                \
                        int rn = t1 - j >= RN_MAX ? RN_MAX : t1 - j >= 4 && RN_MAX > 4 ? 4         \
                                 : t1 - j >= 2 ? 2 : 1;                                            \
                        const uint8_t *x[RN_MAX];                                                  \
                        for (int jj = 0; jj < rn; jj++) x[jj] = act_row(a, j + jj);                \
                        float c[RM_MAX * RN_MAX];                                                  \
                        if (rm == RM_MAX) {                                                        \
                            if (rn == RN_MAX) tile_##name(a, w, x, RM_MAX, RN_MAX, c);             \
                            else if (rn == 4) tile_##name(a, w, x, RM_MAX, RN_MAX > 4 ? 4 : 1, c); \
                            else if (rn == 2) tile_##name(a, w, x, RM_MAX, 2, c);                  \
                            else tile_##name(a, w, x, RM_MAX, 1, c);                               \
                        } else {                                                                   \
                            if (rn == RN_MAX) tile_##name(a, w, x, 1, RN_MAX, c);                  \
                            else if (rn == 4) tile_##name(a, w, x, 1, RN_MAX > 4 ? 4 : 1, c);      \
                            else if (rn == 2) tile_##name(a, w, x, 1, 2, c);                       \
                            else tile_##name(a, w, x, 1, 1, c);                                    \
                        }                                                                          \
                        store_tile(a, r, j, rm, rn, c, RN_MAX);                                    \
                        j += rn;                                                                   \
                    }                                                                              \
                    r += rm;                                                                       \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

/* gemm_<name>: the tiled driver for any number of tokens */
#define DEFINE_GEMM(name, RM_MAX, RN_MAX)                                                          \
    DEFINE_TILED(name, RM_MAX, RN_MAX)                                                             \
    static void gemm_##name(const ktl_gemm_args *a, int64_t r0, int64_t r1) { tiled_##name(a, r0, r1); }

/* gemm_<name> with one token (decode) handed to the ISA header's gemv_<name>(args, r0, r1), a
 * kernel for T = 1 over whole rows (the tiles' per-row tail and token-side work do not
 * amortise there); with a k split (KTL_GEMV_ACT_BYTES) the tiled driver runs. */
#define DEFINE_GEMM_GEMV(name, RM_MAX, RN_MAX)                                                     \
    DEFINE_TILED(name, RM_MAX, RN_MAX)                                                             \
    static void gemm_##name(const ktl_gemm_args *a, int64_t r0, int64_t r1) {                      \
        if (a->ntok == 1 && k_chunk(a) == a->k) gemv_##name(a, r0, r1);                           \
        else tiled_##name(a, r0, r1);                                                              \
    }

#if KTL_ISA == 2
#include "kern_avx512.h"
#define KTL_Q45K_ACT KTL_ACT_Q8_KP
#define KTL_TABLE ktl_kernels_avx512
#define KTL_NAME "avx512"
#elif KTL_ISA == 1
#include "kern_avx2.h"
#define KTL_Q45K_ACT KTL_ACT_Q8_K
#define KTL_TABLE ktl_kernels_avx2
#define KTL_NAME "avx2"
#else
#include "kern_scalar.h"
#define KTL_Q45K_ACT KTL_ACT_Q8_K
#define KTL_TABLE ktl_kernels_scalar
#define KTL_NAME "scalar"
#endif

/* ------------------------------------------------------------------ activation quantisation */

/* Q8_0 rows use blocks of 32, Q8_K rows blocks of 256; both from quant_block (ISA header):
 * d = amax/127, q = round-to-even(x * 127/amax) clamped to [-127, 127], NaN -> 0 (amax
 * ignores NaN), plus the sum of every 16 codes. Each step is exact or elementwise, so all ISA
 * builds produce the same bytes. */
static void quant_q8_0(const float *x, int64_t k, uint8_t *row, const ktl_act_layout *lay) {
    int8_t *q = (int8_t *)row;
    float *d = (float *)(row + lay->d_off);
    int32_t *s = (int32_t *)(row + lay->s_off);
    int64_t nb = k / KTL_QK;
    for (int64_t b = 0; b < nb; b++) {
        int32_t sums[2];
        quant_block(x + b * KTL_QK, KTL_QK, q + b * KTL_QK, d + b, sums);
        s[b] = sums[0] + sums[1];
    }
}

static void quant_q8_k(const float *x, int64_t k, uint8_t *row, const ktl_act_layout *lay) {
    int8_t *q = (int8_t *)row;
    float *d = (float *)(row + lay->d_off);
    int16_t *bs = (int16_t *)(row + lay->s_off);
    for (int64_t b = 0; b < k / KTL_QKK; b++) {
        int32_t sums[16];
        quant_block(x + b * KTL_QKK, KTL_QKK, q + b * KTL_QKK, d + b, sums);
        for (int g = 0; g < 16; g++) bs[b * 16 + g] = (int16_t)sums[g];
    }
}

/* Q8_K with the 32-groups of each block in the order 0 2 1 3 4 6 5 7 (KTL_ACT_Q8_KP) */
static void quant_q8_kp(const float *x, int64_t k, uint8_t *row, const ktl_act_layout *lay) {
    quant_q8_k(x, k, row, lay);
    static const int order[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    for (int64_t b = 0; b < k / KTL_QKK; b++) {
        int8_t tmp[KTL_QKK];
        int8_t *q = (int8_t *)row + b * KTL_QKK;
        memcpy(tmp, q, KTL_QKK);
        for (int g = 0; g < 8; g++) memcpy(q + 32 * g, tmp + 32 * order[g], 32);
    }
}

/* The bandwidth probe's inner loop: 64-bit sums with the ISA's widest loads (read_sum_isa in the
 * ISA header covers the multiple of its step), the tail bytewise. */
static uint64_t read_sum(const uint8_t *p, int64_t n) {
    int64_t done = 0;
    uint64_t total = read_sum_isa(p, n, &done);
    for (int64_t i = done; i < n; i++) total += p[i];
    return total;
}

const ktl_kernels KTL_TABLE = {
    .name = KTL_NAME,
    .gemm = {
        [KTL_F32] = gemm_f32, [KTL_F16] = gemm_f16, [KTL_BF16] = gemm_bf16,
        [KTL_Q4_0] = gemm_q4_0, [KTL_Q4_1] = gemm_q4_1, [KTL_Q5_0] = gemm_q5_0,
        [KTL_Q5_1] = gemm_q5_1, [KTL_Q8_0] = gemm_q8_0,
        [KTL_Q2_K] = gemm_q2_k, [KTL_Q3_K] = gemm_q3_k, [KTL_Q4_K] = gemm_q4_k,
        [KTL_Q5_K] = gemm_q5_k, [KTL_Q6_K] = gemm_q6_k,
    },
    .quant = {NULL, quant_q8_0, quant_q8_k, quant_q8_kp},
    .act_kind = {
        [KTL_F32] = KTL_ACT_F32, [KTL_F16] = KTL_ACT_F32, [KTL_BF16] = KTL_ACT_F32,
        [KTL_Q4_0] = KTL_ACT_Q8_0, [KTL_Q4_1] = KTL_ACT_Q8_0, [KTL_Q5_0] = KTL_ACT_Q8_0,
        [KTL_Q5_1] = KTL_ACT_Q8_0, [KTL_Q8_0] = KTL_ACT_Q8_0,
        [KTL_Q2_K] = KTL_ACT_Q8_K, [KTL_Q3_K] = KTL_ACT_Q8_K, [KTL_Q4_K] = KTL_Q45K_ACT,
        [KTL_Q5_K] = KTL_Q45K_ACT, [KTL_Q6_K] = KTL_ACT_Q8_K,
    },
    .read_sum = read_sum,
};
