/* kt_amx kernels: ONE source compiled once per ISA level (see kt_amx/_build.py).
 *
 *   KT_LEVEL=1  -mavx2 -mfma -mf16c                              -> kt_ops_avx2
 *   KT_LEVEL=2  + -mavx512f/bw/vl/vnni/bf16                       -> kt_ops_avx512
 *   KT_LEVEL=3  + -mamx-tile/int8/bf16 (or KT_AMX_EMULATE in C)  -> kt_ops_amx
 *
 * Every function is static and reached only through the variant's kt_isa_ops table, which
 * the dispatcher (cpu_detect.c) picks after CPUID/XCR0 say the instructions exist.
 * Layouts: kt_internal.h.
 */
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kt_internal.h"

#if !defined(KT_LEVEL) || KT_LEVEL < 1 || KT_LEVEL > 3
#error "compile kernels.c with -DKT_LEVEL=1|2|3"
#endif

#if KT_LEVEL == 1
#define KT_FN(name) name##_avx2
#define KT_OPS kt_ops_avx2
#elif KT_LEVEL == 2
#define KT_FN(name) name##_avx512
#define KT_OPS kt_ops_avx512
#else
#define KT_FN(name) name##_amx
#define KT_OPS kt_ops_amx
#endif

#define KT_INLINE static inline __attribute__((always_inline))
#define KT_MIN(a, b) ((a) < (b) ? (a) : (b))

/* 4 bytes read without alignment or aliasing assumptions (compiles to one mov). */
KT_INLINE int32_t ld32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Dispatches a micro-kernel over the row-block sizes 1..N with the size as a constant. */
#define KT_MB_SWITCH8(MB_VAR, CALL) \
    switch (MB_VAR) {               \
    case 8: CALL(8); break;         \
    case 7: CALL(7); break;         \
    case 6: CALL(6); break;         \
    case 5: CALL(5); break;         \
    case 4: CALL(4); break;         \
    case 3: CALL(3); break;         \
    case 2: CALL(2); break;         \
    default: CALL(1); break;        \
    }
#define KT_MB_SWITCH4(MB_VAR, CALL) \
    switch (MB_VAR) {               \
    case 4: CALL(4); break;         \
    case 3: CALL(3); break;         \
    case 2: CALL(2); break;         \
    default: CALL(1); break;        \
    }
#define KT_MB_SWITCH2(MB_VAR, CALL) \
    switch (MB_VAR) {               \
    case 2: CALL(2); break;         \
    default: CALL(1); break;        \
    }

static float scalar_gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

#if KT_LEVEL >= 2
/* ===================================== AVX-512 ====================================== */

/* 16 activations from fp32 or bf16. */
KT_INLINE __m512 ld16(const uint8_t *p, int32_t dtype) {
    if (dtype == KT_DT_F32) return _mm512_loadu_ps(p);
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* 16 scales (or mins) stored as fp32 or fp16. */
KT_INLINE __m512 ld_scales16(const uint8_t *p, int32_t f32) {
    if (f32) return _mm512_loadu_ps(p);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static void KT_FN(quantize)(const kt_fmt *fmt, int32_t k, int32_t group, const void *src, int32_t dtype,
                            int64_t src_stride, uint8_t *dst, int64_t dst_stride, float *scale,
                            int32_t *gsum, int32_t gstride, int32_t rows) {
    const int64_t esz = dtype == KT_DT_F32 ? 4 : 2;
    for (int32_t r = 0; r < rows; r++) {
        const uint8_t *s = (const uint8_t *)src + r * src_stride * esz;
        uint8_t *d = dst + r * dst_stride;
        if (fmt->format == KT_FMT_BF16) {
            if (dtype == KT_DT_BF16) {
                memcpy(d, s, (size_t)k * 2);
            } else {
                for (int32_t i = 0; i < k; i += 32) {
                    __m512 lo = _mm512_loadu_ps(s + 4 * i), hi = _mm512_loadu_ps(s + 4 * i + 64);
                    _mm512_storeu_si512(d + 2 * i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                }
            }
            continue;
        }
        int32_t *gs = gsum + (int64_t)r * gstride;
        float *sc = scale + (int64_t)r * gstride;
        for (int32_t g = 0; g < k / group; g++) {
            __m512 vmax = _mm512_setzero_ps();
            for (int32_t i = g * group; i < (g + 1) * group; i += 16)
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(ld16(s + esz * i, dtype)));
            const float amax = _mm512_reduce_max_ps(vmax);
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            sc[g] = amax / 127.0f;
            __m512i sum = _mm512_setzero_si512();
            for (int32_t i = g * group; i < (g + 1) * group; i += 16) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(ld16(s + esz * i, dtype), inv));
                _mm_storeu_si128((__m128i *)(d + i), _mm512_cvtepi32_epi8(q));
                sum = _mm512_add_epi32(sum, q);
            }
            gs[g] = _mm512_reduce_add_epi32(sum);
        }
    }
}

/* Prefetches the line `ahead` bytes past p into L1 when it lies before `end` (integer
 * arithmetic: the address may be past the weights). */
KT_INLINE void prefetch_ahead(const uint8_t *p, int64_t ahead, const uint8_t *end) {
    const uintptr_t a = (uintptr_t)p + (uintptr_t)ahead;
    if (ahead && a < (uintptr_t)end) _mm_prefetch((const char *)a, _MM_HINT_T0);
}

/* int8 / int4 micro-kernel: MB activation rows x one 16-row panel. */
KT_INLINE void mk512_int(const int MB, const int is4, const kt_fmt *fmt, const kt_mat *W, const uint8_t *wp,
                         const uint8_t *sp, const uint8_t *mp, const kt_act *A, int32_t row, float *out,
                         int64_t ldo, const uint8_t *pf_end) {
    const int32_t G = W->group, ng = W->ngroups;
    const int64_t gbytes = is4 ? (int64_t)G * 8 : (int64_t)G * 16;
    const int64_t sstep = fmt->scale_f32 ? 64 : 32;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    /* one activation row: the weights stream once, so fetch ahead of the loads, up to pf_end
     * (the end of this call's panels: the next panel follows this one in memory, the one after
     * the last is another work item's) */
    const int64_t pf = MB == 1 ? atomic_load_explicit(&kt_prefetch_bytes, memory_order_relaxed) : 0;
    const uint8_t *xr[MB];
    const int32_t *gs[MB];
    const float *xs[MB];
    __m512 facc[MB];
    for (int m = 0; m < MB; m++) {
        xr[m] = A->data + kt_act_row(A, row + m) * A->stride;
        gs[m] = A->gsum + kt_act_row(A, row + m) * A->gstride;
        xs[m] = A->scale + kt_act_row(A, row + m) * A->gstride;
        facc[m] = _mm512_setzero_ps();
    }
    for (int32_t g = 0; g < ng; g++) {
        __m512i acc[MB];
        for (int m = 0; m < MB; m++) acc[m] = _mm512_set1_epi32(-fmt->zero * gs[m][g]);
        const uint8_t *wg = wp + g * gbytes;
        const int64_t xo = (int64_t)g * G;
        if (is4) {
            for (int32_t j = 0; j < G / 8; j++) {
                prefetch_ahead(wg + 64 * j, pf, pf_end);
                __m512i v = _mm512_loadu_si512(wg + 64 * j);
                __m512i lo = _mm512_and_si512(v, nib);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                for (int m = 0; m < MB; m++) {
                    acc[m] = _mm512_dpbusd_epi32(acc[m], lo, _mm512_set1_epi32(ld32(xr[m] + xo + 8 * j)));
                    acc[m] = _mm512_dpbusd_epi32(acc[m], hi, _mm512_set1_epi32(ld32(xr[m] + xo + 8 * j + 4)));
                }
            }
        } else {
            for (int32_t j = 0; j < G / 4; j++) {
                prefetch_ahead(wg + 64 * j, pf, pf_end);
                __m512i v = _mm512_loadu_si512(wg + 64 * j);
                for (int m = 0; m < MB; m++)
                    acc[m] = _mm512_dpbusd_epi32(acc[m], v, _mm512_set1_epi32(ld32(xr[m] + xo + 4 * j)));
            }
        }
        const __m512 sv = ld_scales16(sp + g * sstep, fmt->scale_f32);
        for (int m = 0; m < MB; m++)
            facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_mul_ps(sv, _mm512_set1_ps(xs[m][g])), facc[m]);
        if (fmt->has_min) {
            const __m512 mv = ld_scales16(mp + g * sstep, fmt->scale_f32);
            for (int m = 0; m < MB; m++)
                facc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps((float)gs[m][g] * xs[m][g]), facc[m]);
        }
    }
    for (int m = 0; m < MB; m++) _mm512_storeu_ps(out + m * ldo, facc[m]);
}

/* bf16 micro-kernel: vdpbf16ps with the activation pair broadcast. */
KT_INLINE void mk512_bf16(const int MB, const kt_mat *W, const uint8_t *wp, const kt_act *A, int32_t row,
                          float *out, int64_t ldo) {
    const uint8_t *xr[MB];
    __m512 acc[MB];
    for (int m = 0; m < MB; m++) {
        xr[m] = A->data + kt_act_row(A, row + m) * A->stride;
        acc[m] = _mm512_setzero_ps();
    }
    for (int32_t j = 0; j < W->k / 2; j++) {
        __m512i v = _mm512_loadu_si512(wp + 64 * (int64_t)j);
        for (int m = 0; m < MB; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)v, (__m512bh)_mm512_set1_epi32(ld32(xr[m] + 4 * j)));
    }
    for (int m = 0; m < MB; m++) _mm512_storeu_ps(out + m * ldo, acc[m]);
}

static void KT_FN(gemm)(const kt_fmt *fmt, const kt_mat *W, int32_t slot, int32_t panel0, int32_t npanels,
                        const kt_act *A, int32_t row0, int32_t M, float *out, int64_t ldo) {
    const uint8_t *pf_end = W->w + slot * W->w_slot + (int64_t)(panel0 + npanels) * W->w_panel;
    for (int32_t i = 0; i < npanels; i++) {
        const int64_t p = panel0 + i;
        const uint8_t *wp = W->w + slot * W->w_slot + p * W->w_panel;
        const uint8_t *sp = W->scale ? W->scale + slot * W->s_slot + p * W->s_panel : NULL;
        const uint8_t *mp = W->zmin ? W->zmin + slot * W->s_slot + p * W->s_panel : NULL;
        for (int32_t m0 = 0; m0 < M; m0 += 8) {
            const int mb = KT_MIN(8, M - m0);
            float *o = out + (int64_t)m0 * ldo + 16 * i;
            if (fmt->format == KT_FMT_BF16) {
#define KT_CALL(n) mk512_bf16(n, W, wp, A, row0 + m0, o, ldo)
                KT_MB_SWITCH8(mb, KT_CALL)
#undef KT_CALL
            } else if (fmt->format == KT_FMT_INT4) {
#define KT_CALL(n) mk512_int(n, 1, fmt, W, wp, sp, mp, A, row0 + m0, o, ldo, pf_end)
                KT_MB_SWITCH8(mb, KT_CALL)
#undef KT_CALL
            } else {
#define KT_CALL(n) mk512_int(n, 0, fmt, W, wp, sp, mp, A, row0 + m0, o, ldo, pf_end)
                KT_MB_SWITCH8(mb, KT_CALL)
#undef KT_CALL
            }
        }
    }
}

/* exp(x) for fp32 lanes: 2^n * p(r), |rel err| ~ 2 ulp; inputs clamped to the finite range. */
KT_INLINE __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

KT_INLINE __m512 act512(int32_t act, __m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    if (act == KT_ACT_SILU) return _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    if (act == KT_ACT_RELU) return _mm512_max_ps(g, _mm512_setzero_ps());
    if (act == KT_ACT_GELU_TANH) {
        __m512 a = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g), _mm512_mul_ps(g, g), g));
        __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(exp512(_mm512_add_ps(a, a)), one)));
        return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, t));
    }
    float tmp[16];
    _mm512_storeu_ps(tmp, g);
    for (int i = 0; i < 16; i++) tmp[i] = scalar_gelu_erf(tmp[i]);
    return _mm512_loadu_ps(tmp);
}

static void KT_FN(act_mul)(int32_t act, float *h, int64_t ldh, const float *g, const float *u, int64_t ldgu,
                           int32_t rows, int32_t cols) {
    for (int32_t r = 0; r < rows; r++)
        for (int32_t c = 0; c < cols; c += 16)
            _mm512_storeu_ps(h + r * ldh + c, _mm512_mul_ps(act512(act, _mm512_loadu_ps(g + r * ldgu + c)),
                                                            _mm512_loadu_ps(u + r * ldgu + c)));
}

static void KT_FN(reduce)(void *y, int32_t y_dtype, int32_t H, const float *ypair, const int32_t *tk_row,
                          const float *w, int32_t K, int32_t t0, int32_t t1, int32_t c0, int32_t c1) {
    for (int32_t t = t0; t < t1; t++) {
        const int32_t *rows = tk_row + (int64_t)t * K;
        const float *wt = w + (int64_t)t * K;
        for (int32_t n = c0; n < c1; n += 16) {
            __m512 a = _mm512_setzero_ps();
            for (int32_t k = 0; k < K; k++) {
                if (rows[k] < 0) continue;
                a = _mm512_fmadd_ps(_mm512_set1_ps(wt[k]), _mm512_loadu_ps(ypair + (int64_t)rows[k] * H + n), a);
            }
            if (y_dtype == KT_DT_F32)
                _mm512_storeu_ps((float *)y + (int64_t)t * H + n, a);
            else
                _mm256_storeu_si256((__m256i *)((uint16_t *)y + (int64_t)t * H + n), (__m256i)_mm512_cvtneps_pbh(a));
        }
    }
}

static void KT_FN(store_rows)(void *y, int32_t y_dtype, int64_t ldy, const float *src, int64_t lds,
                              const float *bias, int32_t rows, int32_t cols) {
    for (int32_t r = 0; r < rows; r++) {
        const float *s = src + (int64_t)r * lds;
        for (int32_t c = 0; c < cols; c += 16) {
            const __mmask16 mk = cols - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - c)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(mk, s + c);
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + c));
            if (y_dtype == KT_DT_F32)
                _mm512_mask_storeu_ps((float *)y + (int64_t)r * ldy + c, mk, v);
            else
                _mm256_mask_storeu_epi16((uint16_t *)y + (int64_t)r * ldy + c, mk, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

#else
/* ======================================= AVX2 ======================================= */

KT_INLINE __m256 ld8(const uint8_t *p, int32_t dtype) {
    if (dtype == KT_DT_F32) return _mm256_loadu_ps((const float *)p);
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

KT_INLINE __m256 ld_scales8(const uint8_t *p, int32_t f32) {
    if (f32) return _mm256_loadu_ps((const float *)p);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

KT_INLINE float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

KT_INLINE int32_t hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static void KT_FN(quantize)(const kt_fmt *fmt, int32_t k, int32_t group, const void *src, int32_t dtype,
                            int64_t src_stride, uint8_t *dst, int64_t dst_stride, float *scale,
                            int32_t *gsum, int32_t gstride, int32_t rows) {
    const int64_t esz = dtype == KT_DT_F32 ? 4 : 2;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int32_t r = 0; r < rows; r++) {
        const uint8_t *s = (const uint8_t *)src + r * src_stride * esz;
        uint8_t *d = dst + r * dst_stride;
        if (fmt->format == KT_FMT_BF16) {  /* fp32 rows at this level */
            for (int32_t i = 0; i < k; i += 8) _mm256_storeu_ps((float *)(d + 4 * i), ld8(s + esz * i, dtype));
            continue;
        }
        int32_t *gs = gsum + (int64_t)r * gstride;
        float *sc = scale + (int64_t)r * gstride;
        for (int32_t g = 0; g < k / group; g++) {
            __m256 vmax = _mm256_setzero_ps();
            for (int32_t i = g * group; i < (g + 1) * group; i += 8)
                vmax = _mm256_max_ps(vmax, _mm256_and_ps(ld8(s + esz * i, dtype), absmask));
            const float amax = hmax8(vmax);
            const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            sc[g] = amax / 127.0f;
            __m256i sum = _mm256_setzero_si256();
            for (int32_t i = g * group; i < (g + 1) * group; i += 32) {
                __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(ld8(s + esz * i, dtype), inv));
                __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(ld8(s + esz * (i + 8), dtype), inv));
                __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(ld8(s + esz * (i + 16), dtype), inv));
                __m256i q3 = _mm256_cvtps_epi32(_mm256_mul_ps(ld8(s + esz * (i + 24), dtype), inv));
                sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3)));
                __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
                _mm256_storeu_si256((__m256i *)(d + i), _mm256_permutevar8x32_epi32(b, order));
            }
            gs[g] = hsum8i(sum);
        }
    }
}

/* int4: nibbles -> u8, vpmaddubsw (u8 x s8 -> s16 pairs, no saturation for u <= 15), vpmaddwd. */
KT_INLINE void mk256_int4(const int MB, const kt_fmt *fmt, const kt_mat *W, const uint8_t *wp, const uint8_t *sp,
                          const uint8_t *mp, const kt_act *A, int32_t row, float *out, int64_t ldo) {
    const int32_t G = W->group, ng = W->ngroups;
    const int64_t sstep = fmt->scale_f32 ? 64 : 32, shalf = sstep / 2;
    const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const uint8_t *xr[MB];
    const int32_t *gs[MB];
    const float *xs[MB];
    __m256 facc[MB][2];
    for (int m = 0; m < MB; m++) {
        xr[m] = A->data + kt_act_row(A, row + m) * A->stride;
        gs[m] = A->gsum + kt_act_row(A, row + m) * A->gstride;
        xs[m] = A->scale + kt_act_row(A, row + m) * A->gstride;
        facc[m][0] = facc[m][1] = _mm256_setzero_ps();
    }
    for (int32_t g = 0; g < ng; g++) {
        __m256i acc[MB][2];
        for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm256_set1_epi32(-fmt->zero * gs[m][g]);
        const uint8_t *wg = wp + (int64_t)g * G * 8;
        const int64_t xo = (int64_t)g * G;
        for (int32_t j = 0; j < G / 8; j++) {
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(wg + 64 * j));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(wg + 64 * j + 32));
            __m256i lo0 = _mm256_and_si256(v0, nib), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), nib);
            __m256i lo1 = _mm256_and_si256(v1, nib), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), nib);
            for (int m = 0; m < MB; m++) {
                __m256i xl = _mm256_set1_epi32(ld32(xr[m] + xo + 8 * j));
                __m256i xh = _mm256_set1_epi32(ld32(xr[m] + xo + 8 * j + 4));
                __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xl), _mm256_maddubs_epi16(hi0, xh));
                __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xl), _mm256_maddubs_epi16(hi1, xh));
                acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(s0, ones));
                acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(s1, ones));
            }
        }
        const uint8_t *sg = sp + g * sstep;
        const __m256 s0 = ld_scales8(sg, fmt->scale_f32), s1 = ld_scales8(sg + shalf, fmt->scale_f32);
        for (int m = 0; m < MB; m++) {
            const __m256 x = _mm256_set1_ps(xs[m][g]);
            facc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][0]), _mm256_mul_ps(s0, x), facc[m][0]);
            facc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][1]), _mm256_mul_ps(s1, x), facc[m][1]);
        }
        if (fmt->has_min) {
            const uint8_t *mg = mp + g * sstep;
            const __m256 m0 = ld_scales8(mg, fmt->scale_f32), m1 = ld_scales8(mg + shalf, fmt->scale_f32);
            for (int m = 0; m < MB; m++) {
                const __m256 xsum = _mm256_set1_ps((float)gs[m][g] * xs[m][g]);
                facc[m][0] = _mm256_fmadd_ps(m0, xsum, facc[m][0]);
                facc[m][1] = _mm256_fmadd_ps(m1, xsum, facc[m][1]);
            }
        }
    }
    for (int m = 0; m < MB; m++) {
        _mm256_storeu_ps(out + m * ldo, facc[m][0]);
        _mm256_storeu_ps(out + m * ldo + 8, facc[m][1]);
    }
}

/* int8: u8 widened to s16, vpmaddwd against the broadcast quad of activations; the lanes hold
 * pair sums of 4 rows, folded to 8 rows by vphaddd + a 64-bit permute. Exact for all u8. */
KT_INLINE void mk256_int8(const int MB, const kt_fmt *fmt, const kt_mat *W, const uint8_t *wp, const uint8_t *sp,
                          const kt_act *A, int32_t row, float *out, int64_t ldo) {
    const int32_t G = W->group, ng = W->ngroups;
    const int64_t sstep = fmt->scale_f32 ? 64 : 32, shalf = sstep / 2;
    const uint8_t *xr[MB];
    const int32_t *gs[MB];
    const float *xs[MB];
    __m256 facc[MB][2];
    for (int m = 0; m < MB; m++) {
        xr[m] = A->data + kt_act_row(A, row + m) * A->stride;
        gs[m] = A->gsum + kt_act_row(A, row + m) * A->gstride;
        xs[m] = A->scale + kt_act_row(A, row + m) * A->gstride;
        facc[m][0] = facc[m][1] = _mm256_setzero_ps();
    }
    for (int32_t g = 0; g < ng; g++) {
        __m256i acc[MB][4];
        for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_si256();
        const uint8_t *wg = wp + (int64_t)g * G * 16;
        const int64_t xo = (int64_t)g * G;
        for (int32_t j = 0; j < G / 4; j++) {
            const uint8_t *wq = wg + 64 * j;
            __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)wq));
            __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wq + 16)));
            __m256i w2 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wq + 32)));
            __m256i w3 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wq + 48)));
            for (int m = 0; m < MB; m++) {
                __m256i xb = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(ld32(xr[m] + xo + 4 * j))));
                acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(w0, xb));
                acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(w1, xb));
                acc[m][2] = _mm256_add_epi32(acc[m][2], _mm256_madd_epi16(w2, xb));
                acc[m][3] = _mm256_add_epi32(acc[m][3], _mm256_madd_epi16(w3, xb));
            }
        }
        const uint8_t *sg = sp + g * sstep;
        const __m256 s0 = ld_scales8(sg, fmt->scale_f32), s1 = ld_scales8(sg + shalf, fmt->scale_f32);
        for (int m = 0; m < MB; m++) {
            const __m256i z = _mm256_set1_epi32(fmt->zero * gs[m][g]);
            __m256i r0 = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][0], acc[m][1]), 0xD8);
            __m256i r1 = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][2], acc[m][3]), 0xD8);
            const __m256 x = _mm256_set1_ps(xs[m][g]);
            facc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(r0, z)), _mm256_mul_ps(s0, x), facc[m][0]);
            facc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(r1, z)), _mm256_mul_ps(s1, x), facc[m][1]);
        }
    }
    for (int m = 0; m < MB; m++) {
        _mm256_storeu_ps(out + m * ldo, facc[m][0]);
        _mm256_storeu_ps(out + m * ldo + 8, facc[m][1]);
    }
}

/* bf16 weights widened to fp32 (shift / mask), fp32 activations, FMA. */
KT_INLINE void mk256_bf16(const int MB, const kt_mat *W, const uint8_t *wp, const kt_act *A, int32_t row,
                          float *out, int64_t ldo) {
    const __m256i himask = _mm256_set1_epi32((int32_t)0xFFFF0000u);
    const float *xr[MB];
    __m256 acc[MB][2];
    for (int m = 0; m < MB; m++) {
        xr[m] = (const float *)(A->data + kt_act_row(A, row + m) * A->stride);
        acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    }
    for (int32_t j = 0; j < W->k / 2; j++) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(wp + 64 * (int64_t)j));
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(wp + 64 * (int64_t)j + 32));
        __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, himask));
        __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, himask));
        for (int m = 0; m < MB; m++) {
            __m256 xe = _mm256_broadcast_ss(xr[m] + 2 * j), xo = _mm256_broadcast_ss(xr[m] + 2 * j + 1);
            acc[m][0] = _mm256_fmadd_ps(o0, xo, _mm256_fmadd_ps(e0, xe, acc[m][0]));
            acc[m][1] = _mm256_fmadd_ps(o1, xo, _mm256_fmadd_ps(e1, xe, acc[m][1]));
        }
    }
    for (int m = 0; m < MB; m++) {
        _mm256_storeu_ps(out + m * ldo, acc[m][0]);
        _mm256_storeu_ps(out + m * ldo + 8, acc[m][1]);
    }
}

static void KT_FN(gemm)(const kt_fmt *fmt, const kt_mat *W, int32_t slot, int32_t panel0, int32_t npanels,
                        const kt_act *A, int32_t row0, int32_t M, float *out, int64_t ldo) {
    for (int32_t i = 0; i < npanels; i++) {
        const int64_t p = panel0 + i;
        const uint8_t *wp = W->w + slot * W->w_slot + p * W->w_panel;
        const uint8_t *sp = W->scale ? W->scale + slot * W->s_slot + p * W->s_panel : NULL;
        const uint8_t *mp = W->zmin ? W->zmin + slot * W->s_slot + p * W->s_panel : NULL;
        if (fmt->format == KT_FMT_BF16) {
            for (int32_t m0 = 0; m0 < M; m0 += 4) {
                const int mb = KT_MIN(4, M - m0);
#define KT_CALL(n) mk256_bf16(n, W, wp, A, row0 + m0, out + (int64_t)m0 * ldo + 16 * i, ldo)
                KT_MB_SWITCH4(mb, KT_CALL)
#undef KT_CALL
            }
        } else {
            for (int32_t m0 = 0; m0 < M; m0 += 2) {
                const int mb = KT_MIN(2, M - m0);
                float *o = out + (int64_t)m0 * ldo + 16 * i;
                if (fmt->format == KT_FMT_INT4) {
#define KT_CALL(n) mk256_int4(n, fmt, W, wp, sp, mp, A, row0 + m0, o, ldo)
                    KT_MB_SWITCH2(mb, KT_CALL)
#undef KT_CALL
                } else {
#define KT_CALL(n) mk256_int8(n, fmt, W, wp, sp, A, row0 + m0, o, ldo)
                    KT_MB_SWITCH2(mb, KT_CALL)
#undef KT_CALL
                }
            }
        }
    }
}

KT_INLINE __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

KT_INLINE __m256 act256(int32_t act, __m256 g) {
    const __m256 one = _mm256_set1_ps(1.0f);
    if (act == KT_ACT_SILU) return _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    if (act == KT_ACT_RELU) return _mm256_max_ps(g, _mm256_setzero_ps());
    if (act == KT_ACT_GELU_TANH) {
        __m256 a = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g), _mm256_mul_ps(g, g), g));
        __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(exp256(_mm256_add_ps(a, a)), one)));
        return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(one, t));
    }
    float tmp[8];
    _mm256_storeu_ps(tmp, g);
    for (int i = 0; i < 8; i++) tmp[i] = scalar_gelu_erf(tmp[i]);
    return _mm256_loadu_ps(tmp);
}

static void KT_FN(act_mul)(int32_t act, float *h, int64_t ldh, const float *g, const float *u, int64_t ldgu,
                           int32_t rows, int32_t cols) {
    for (int32_t r = 0; r < rows; r++)
        for (int32_t c = 0; c < cols; c += 8)
            _mm256_storeu_ps(h + r * ldh + c, _mm256_mul_ps(act256(act, _mm256_loadu_ps(g + r * ldgu + c)),
                                                            _mm256_loadu_ps(u + r * ldgu + c)));
}

/* fp32 -> bf16, round to nearest even (finite inputs). */
KT_INLINE __m128i bf16x8(__m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

static void KT_FN(reduce)(void *y, int32_t y_dtype, int32_t H, const float *ypair, const int32_t *tk_row,
                          const float *w, int32_t K, int32_t t0, int32_t t1, int32_t c0, int32_t c1) {
    for (int32_t t = t0; t < t1; t++) {
        const int32_t *rows = tk_row + (int64_t)t * K;
        const float *wt = w + (int64_t)t * K;
        for (int32_t n = c0; n < c1; n += 16) {
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
            for (int32_t k = 0; k < K; k++) {
                if (rows[k] < 0) continue;
                const float *yp = ypair + (int64_t)rows[k] * H + n;
                const __m256 wk = _mm256_set1_ps(wt[k]);
                a = _mm256_fmadd_ps(wk, _mm256_loadu_ps(yp), a);
                b = _mm256_fmadd_ps(wk, _mm256_loadu_ps(yp + 8), b);
            }
            if (y_dtype == KT_DT_F32) {
                float *yo = (float *)y + (int64_t)t * H + n;
                _mm256_storeu_ps(yo, a);
                _mm256_storeu_ps(yo + 8, b);
            } else {
                uint16_t *yo = (uint16_t *)y + (int64_t)t * H + n;
                _mm_storeu_si128((__m128i *)yo, bf16x8(a));
                _mm_storeu_si128((__m128i *)(yo + 8), bf16x8(b));
            }
        }
    }
}

static void KT_FN(store_rows)(void *y, int32_t y_dtype, int64_t ldy, const float *src, int64_t lds,
                              const float *bias, int32_t rows, int32_t cols) {
    for (int32_t r = 0; r < rows; r++) {
        const float *s = src + (int64_t)r * lds;
        for (int32_t c = 0; c < cols; c += 8) {
            const int32_t nc = KT_MIN(8, cols - c);
            float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0}, bt[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            memcpy(tmp, s + c, sizeof(float) * (size_t)nc);
            if (bias) memcpy(bt, bias + c, sizeof(float) * (size_t)nc);
            const __m256 v = _mm256_add_ps(_mm256_loadu_ps(tmp), _mm256_loadu_ps(bt));
            if (y_dtype == KT_DT_F32) {
                _mm256_storeu_ps(tmp, v);
                memcpy((float *)y + (int64_t)r * ldy + c, tmp, sizeof(float) * (size_t)nc);
            } else {
                uint16_t h[8];
                _mm_storeu_si128((__m128i *)h, bf16x8(v));
                memcpy((uint16_t *)y + (int64_t)r * ldy + c, h, sizeof(uint16_t) * (size_t)nc);
            }
        }
    }
}
#endif /* KT_LEVEL */

#if KT_LEVEL == 3
/* ======================================== AMX ======================================== */

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} kt_tilecfg;

#ifdef KT_AMX_EMULATE
/* Test builds: the tile instructions in plain C, checking the shapes the hardware requires.
 * This lets the AMX code paths (layouts, offsets, tile shapes) run on CPUs without AMX. */
static __thread struct {
    int configured;
    uint8_t rows[8];
    uint16_t colsb[8];
    uint8_t data[8][16][64];
} emu;

static void emu_fail(const char *what) {
    fprintf(stderr, "kt_amx AMX emulation: %s\n", what);
    abort();
}
static void emu_loadconfig(const kt_tilecfg *c) {
    if (c->palette_id != 1) emu_fail("palette must be 1");
    for (int t = 0; t < 8; t++) {
        if (c->rows[t] > 16 || c->colsb[t] > 64) emu_fail("tile larger than 16 x 64 bytes");
        emu.rows[t] = c->rows[t];
        emu.colsb[t] = c->colsb[t];
    }
    emu.configured = 1;
}
static void emu_check(int t) {
    if (!emu.configured || !emu.rows[t]) emu_fail("tile used before configuration");
}
static void emu_loadd(int t, const void *base, long stride) {
    emu_check(t);
    for (int r = 0; r < emu.rows[t]; r++) memcpy(emu.data[t][r], (const uint8_t *)base + r * stride, emu.colsb[t]);
}
static void emu_stored(int t, void *base, long stride) {
    emu_check(t);
    for (int r = 0; r < emu.rows[t]; r++) memcpy((uint8_t *)base + r * stride, emu.data[t][r], emu.colsb[t]);
}
static void emu_zero(int t) {
    emu_check(t);
    memset(emu.data[t], 0, sizeof emu.data[t]);
}
static void emu_shapes(int c, int a, int b) {
    emu_check(c), emu_check(a), emu_check(b);
    if (emu.rows[c] != emu.rows[a] || emu.colsb[c] != emu.colsb[b] || emu.colsb[a] != 4 * emu.rows[b])
        emu_fail("tile shapes do not match for a dot product");
}
static float emu_bf16(const uint8_t *p) {
    uint32_t v = (uint32_t)(p[0] | (p[1] << 8)) << 16;
    float f;
    memcpy(&f, &v, 4);
    return f;
}
static void emu_dpbf16ps(int c, int a, int b) {
    emu_shapes(c, a, b);
    for (int m = 0; m < emu.rows[c]; m++)
        for (int n = 0; n < emu.colsb[c] / 4; n++) {
            float s;
            memcpy(&s, &emu.data[c][m][4 * n], 4);
            for (int kk = 0; kk < emu.rows[b]; kk++)
                s += emu_bf16(&emu.data[a][m][4 * kk]) * emu_bf16(&emu.data[b][kk][4 * n]) +
                     emu_bf16(&emu.data[a][m][4 * kk + 2]) * emu_bf16(&emu.data[b][kk][4 * n + 2]);
            memcpy(&emu.data[c][m][4 * n], &s, 4);
        }
}
/* int8 tile dot product: signed A bytes times B bytes, unsigned (tdpbsud) or signed (tdpbssd:
 * int4 weights unpacked to signed bytes, gemm_amx_v2). */
static void emu_dpbs(int c, int a, int b, int b_signed) {
    emu_shapes(c, a, b);
    for (int m = 0; m < emu.rows[c]; m++)
        for (int n = 0; n < emu.colsb[c] / 4; n++) {
            int32_t s;
            memcpy(&s, &emu.data[c][m][4 * n], 4);
            for (int kk = 0; kk < emu.rows[b]; kk++)
                for (int i = 0; i < 4; i++) {
                    const uint8_t w = emu.data[b][kk][4 * n + i];
                    s += (int8_t)emu.data[a][m][4 * kk + i] * (b_signed ? (int32_t)(int8_t)w : (int32_t)w);
                }
            memcpy(&emu.data[c][m][4 * n], &s, 4);
        }
}
#define KT_TILE_CONFIG(cfg) emu_loadconfig(cfg)
#define KT_TILE_RELEASE() (emu.configured = 0)
#define KT_TILE_LOAD(t, base, stride) emu_loadd(t, base, stride)
#define KT_TILE_STORE(t, base, stride) emu_stored(t, base, stride)
#define KT_TILE_ZERO(t) emu_zero(t)
#define KT_TILE_DPBF16(c, a, b) emu_dpbf16ps(c, a, b)
#define KT_TILE_DPBSUD(c, a, b) emu_dpbs(c, a, b, 0)
#define KT_TILE_DPBSSD(c, a, b) emu_dpbs(c, a, b, 1)
const int kt_amx_emulated_build = 1;
#else
#define KT_TILE_CONFIG(cfg) _tile_loadconfig(cfg)
#define KT_TILE_RELEASE() _tile_release()
#define KT_TILE_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define KT_TILE_STORE(t, base, stride) _tile_stored(t, base, stride)
#define KT_TILE_ZERO(t) _tile_zero(t)
#define KT_TILE_DPBF16(c, a, b) _tile_dpbf16ps(c, a, b)
#define KT_TILE_DPBSUD(c, a, b) _tile_dpbsud(c, a, b)
#define KT_TILE_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)
const int kt_amx_emulated_build = 0;
#endif

/* Tiles: 0-3 C (16 x 16 fp32/int32), 4-5 A (16 rows x kb bytes of activations),
 * 6-7 B (kb/4 rows x 64 bytes of weights). kind 1: kb = 64 (bf16: 32 k; int8: 64 k), kind 2: kb = 32.
 * gemm_amx_v1 uses one A and one B tile, gemm_amx_v2 both. */
static __thread int t_tile_kind;

static void amx_configure(int kind) {
    if (t_tile_kind == kind) return;
    kt_tilecfg cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    const int kb = kind == 1 ? 64 : 32;
    cfg.palette_id = 1;
    for (int t = 0; t < 4; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    for (int t = 4; t < 6; t++) cfg.rows[t] = 16, cfg.colsb[t] = (uint16_t)kb;
    for (int t = 6; t < 8; t++) cfg.rows[t] = (uint8_t)(kb / 4), cfg.colsb[t] = 64;
    KT_TILE_CONFIG(&cfg);
    t_tile_kind = kind;
}

static void KT_FN(tile_release)(void) {
    if (t_tile_kind) {
        KT_TILE_RELEASE();
        t_tile_kind = 0;
    }
}

/* n int4 weights of a panel (n/8 vectors) -> [n/4][16][4] bytes, the B-tile layout of int8
 * weights: vector j's low nibbles are k 8j..8j+3, its high nibbles k 8j+4..8j+7; SYM: as
 * signed bytes u - 8 (variant 2's tdpbssd), else u. The source is prefetched `pf` bytes ahead
 * up to pf_end (pf 0: not). dst 64-byte aligned. */
KT_INLINE void unpack_int4(const int SYM, const uint8_t *src, int32_t n, uint8_t *dst, int64_t pf,
                           const uint8_t *pf_end) {
    const __m512i nib = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    for (int32_t j = 0; j < n / 8; j++) {
        prefetch_ahead(src + 64 * (int64_t)j, pf, pf_end);
        const __m512i v = _mm512_loadu_si512(src + 64 * (int64_t)j);
        __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        if (SYM) lo = _mm512_sub_epi8(lo, eight), hi = _mm512_sub_epi8(hi, eight);
        _mm512_store_si512(dst + 128 * (int64_t)j, lo);
        _mm512_store_si512(dst + 128 * (int64_t)j + 64, hi);
    }
}

#define KT_IF_TILE(nt, MACRO) \
    do {                      \
        MACRO(0);             \
        if ((nt) > 1) MACRO(1); \
        if ((nt) > 2) MACRO(2); \
        if ((nt) > 3) MACRO(3); \
    } while (0)

/* Variant 1 (KT_AMX_GEMM=1; bf16 always): one panel at a time, every group's C tiles stored and
 * rescaled before the next group starts. */
static void gemm_amx_v1(const kt_fmt *fmt, const kt_mat *W, int32_t slot, int32_t panel0, int32_t npanels,
                        const kt_act *A, int32_t row0, int32_t M, float *out, int64_t ldo, uint8_t *scratch) {
    const int32_t k = W->k;
    const long st = (long)A->stride;
    uint8_t *unpacked = scratch;
    int32_t *cbuf = (int32_t *)(scratch + kt_round_up((int64_t)k * 16, 64));
    float *fbuf = (float *)((uint8_t *)cbuf + 4 * 1024);
    for (int32_t i = 0; i < npanels; i++) {
        const int64_t p = panel0 + i;
        const uint8_t *wp = W->w + slot * W->w_slot + p * W->w_panel;
        if (fmt->format == KT_FMT_BF16) {
            amx_configure(1);
            for (int32_t m0 = 0; m0 < M; m0 += 64) {
                const int nt = KT_MIN(4, (M - m0) / 16);
                const uint8_t *a = A->data + (int64_t)(row0 + m0) * st;
#define KT_Z(t) KT_TILE_ZERO(t)
                KT_IF_TILE(nt, KT_Z);
#undef KT_Z
                for (int32_t kc = 0; kc < k / 32; kc++) {
                    KT_TILE_LOAD(6, wp + (int64_t)kc * 1024, 64);
#define KT_DP(t)                                                      \
    do {                                                              \
        KT_TILE_LOAD(4, a + (int64_t)(16 * (t)) * st + kc * 64, st); \
        KT_TILE_DPBF16(t, 4, 6);                                      \
    } while (0)
                    KT_IF_TILE(nt, KT_DP);
#undef KT_DP
                }
#define KT_ST(t) KT_TILE_STORE(t, out + (int64_t)(m0 + 16 * (t)) * ldo + 16 * i, (long)(ldo * 4))
                KT_IF_TILE(nt, KT_ST);
#undef KT_ST
            }
            continue;
        }
        const int32_t G = W->group, ng = W->ngroups;
        const int32_t kb = G % 64 == 0 ? 64 : 32, nch = G / kb; /* groups are multiples of 32 */
        const int64_t sstep = fmt->scale_f32 ? 64 : 32;
        const uint8_t *sp = W->scale + slot * W->s_slot + p * W->s_panel;
        const uint8_t *mp = W->zmin ? W->zmin + slot * W->s_slot + p * W->s_panel : NULL;
        const uint8_t *src = wp;
        if (fmt->format == KT_FMT_INT4) {
            unpack_int4(0, wp, k, unpacked, 0, NULL);
            src = unpacked;
        }
        amx_configure(kb == 64 ? 1 : 2);
        for (int32_t m0 = 0; m0 < M; m0 += 64) {
            const int nt = KT_MIN(4, (M - m0) / 16);
            const uint8_t *a = A->data + (int64_t)(row0 + m0) * st;
            memset(fbuf, 0, (size_t)nt * 16 * 16 * sizeof(float));
            for (int32_t g = 0; g < ng; g++) {
#define KT_Z(t) KT_TILE_ZERO(t)
                KT_IF_TILE(nt, KT_Z);
#undef KT_Z
                for (int32_t ch = 0; ch < nch; ch++) {
                    const int64_t ko = (int64_t)g * G + (int64_t)ch * kb;
                    KT_TILE_LOAD(6, src + ko * 16, 64);
#define KT_DP(t)                                                  \
    do {                                                          \
        KT_TILE_LOAD(4, a + (int64_t)(16 * (t)) * st + ko, st);  \
        KT_TILE_DPBSUD(t, 4, 6);                                  \
    } while (0)
                    KT_IF_TILE(nt, KT_DP);
#undef KT_DP
                }
#define KT_ST(t) KT_TILE_STORE(t, cbuf + 256 * (t), 64)
                KT_IF_TILE(nt, KT_ST);
#undef KT_ST
                const __m512 sv = ld_scales16(sp + g * sstep, fmt->scale_f32);
                const __m512 mv = mp ? ld_scales16(mp + g * sstep, fmt->scale_f32) : _mm512_setzero_ps();
                for (int r = 0; r < nt * 16; r++) {
                    const int64_t at = (int64_t)(row0 + m0 + r) * A->gstride + g;
                    const int32_t gsv = A->gsum[at];
                    const float xsv = A->scale[at];
                    __m512i c = _mm512_sub_epi32(_mm512_loadu_si512(cbuf + 16 * r), _mm512_set1_epi32(fmt->zero * gsv));
                    __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), _mm512_mul_ps(sv, _mm512_set1_ps(xsv)),
                                               _mm512_loadu_ps(fbuf + 16 * r));
                    if (mp) f = _mm512_fmadd_ps(mv, _mm512_set1_ps((float)gsv * xsv), f);
                    _mm512_storeu_ps(fbuf + 16 * r, f);
                }
            }
            for (int r = 0; r < nt * 16; r++)
                _mm512_storeu_ps(out + (int64_t)(m0 + r) * ldo + 16 * i, _mm512_loadu_ps(fbuf + 16 * r));
        }
    }
}

/* ------------------------------------------------------------------ gemm_amx, variant 2
 *
 * The default int8/int4 kernel (KT_AMX_GEMM=1 keeps gemm_amx_v1 above, for A/B timing).
 *
 * Work is cut into units: one weight group of a block of rt row tiles x pt panels, rt * pt <= 4
 * C tiles (pt = 2 with rt <= 2, or pt = 1 with rt <= 4). Tiles: C 0-3 (index rt_i * pt + pt_i),
 * A 4-5, B 6-7, so in a 2 x 2 block every loaded A tile feeds 2 dot products and every B tile 2.
 *
 * The units run as a two-stage pipeline: the dot products of unit u are issued to the tile unit
 * before the vector code rescales the int32 sums of unit u-1 (stored to cbuf) into out, so the
 * AVX-512 rescale of one group overlaps the tile work of the next instead of waiting for it.
 * out itself is the fp32 accumulator (group 0 stores, later groups add), so no buffer of
 * partial sums has to be cleared or copied.
 *
 * Weights: int8 B tiles are loaded straight from the packed panel (u8 = q + 128, tdpbsud) and
 * the zero point comes off exactly in int32 during the rescale (- 128 * the row's code sum).
 * int4 groups are unpacked into signed bytes (symmetric: u - 8, affine: u in 0..15) once per
 * panel block and group, shared by every row block, and multiplied with tdpbssd, which gives the
 * exact integer dot product without a correction. The integer sums equal variant 1's, and the
 * fp32 steps are the same operations in the same order, so both variants agree bit for bit.
 * The weight stream is prefetched kt_prefetch_bytes ahead (KT_AMX_PREFETCH, 0 = off).
 * Scratch: the unpacked int4 groups of a panel pair (2 * G * 16 bytes; a group spanning all of
 * k runs one panel per block so that G * 16 <= k * 16 fits), then 4 C tiles: within
 * kt_amx_scratch_bytes(k) as for variant 1.
 */

/* One unit of work: group g of rt row tiles x pt panels. */
typedef struct {
    const uint8_t *b[2];  /* B rows of the group per panel: [G/4][16][4] bytes, 64 per row */
    const uint8_t *a;     /* activations of the first row at the group's first k */
    const float *xs;      /* activation scales at (first row, g) */
    const int32_t *gs;    /* activation code sums at (first row, g) */
    const uint8_t *s[2];  /* weight scales of the group per panel */
    const uint8_t *mn[2]; /* weight mins (affine int4) or NULL */
    float *o;             /* out at the block's first row and column */
    int rt, pt, first;
    int fetch;            /* first row block of the group: prefetches the weight stream */
} v2_unit;

/* What stays the same for every unit of one call. */
typedef struct {
    int32_t kb, nch, gstride;
    int32_t zero;  /* int32 correction per code sum in the rescale (int8: 128, int4: 0) */
    int sgn;       /* B holds signed bytes (int4: tdpbssd) rather than u8 (int8: tdpbsud) */
    int has_min, scale_f32;
    long ast;      /* bytes between activation rows */
    int64_t ldo;
    /* weight stream prefetch (int8: B tiles come straight from memory; int4: the unpack reads
     * it): bytes ahead (kt_prefetch_bytes, KT_AMX_PREFETCH; 0 = off), up to the end of this
     * call's panels (the panel after them is another work item's) */
    int64_t pf;
    const uint8_t *pf_end;
} v2_ctx;

/* The two tile dot products differ only in B's signedness; SGN is a constant after inlining. */
#define V2_DP(SGN, c, a, b)                \
    do {                                   \
        if (SGN) KT_TILE_DPBSSD(c, a, b);  \
        else KT_TILE_DPBSUD(c, a, b);      \
    } while (0)

/* Zeroes the unit's C tiles and accumulates its group into them. The tile numbers are literals
 * (the instructions encode them); RT, PT and SGN are constants, so the dead branches vanish. */
KT_INLINE void v2_dots_shape(const int RT, const int PT, const int SGN, const v2_ctx *x, const v2_unit *u) {
    const long st = x->ast;
    const uint8_t *a0 = u->a, *a1 = a0 + 16 * st, *a2 = a0 + 32 * st, *a3 = a0 + 48 * st;
    KT_IF_TILE(RT * PT, KT_TILE_ZERO);
    for (int32_t ch = 0; ch < x->nch; ch++) {
        const int64_t ko = (int64_t)ch * x->kb;
        if (!SGN && u->fetch) /* int8: B rows (16 * kb bytes per panel) ahead of the tile loads */
            for (int64_t l = 0; l < 16 * x->kb; l += 64) {
                prefetch_ahead(u->b[0] + ko * 16 + l, x->pf, x->pf_end);
                if (PT > 1) prefetch_ahead(u->b[1] + ko * 16 + l, x->pf, x->pf_end);
            }
        /* all loads of the chunk first: the tile unit can fetch while earlier products run */
        KT_TILE_LOAD(4, a0 + ko, st);
        if (RT > 1) KT_TILE_LOAD(5, a1 + ko, st);
        KT_TILE_LOAD(6, u->b[0] + ko * 16, 64);
        if (PT > 1) KT_TILE_LOAD(7, u->b[1] + ko * 16, 64);
        if (PT > 1) {
            V2_DP(SGN, 0, 4, 6);
            V2_DP(SGN, 1, 4, 7);
            if (RT > 1) {
                V2_DP(SGN, 2, 5, 6);
                V2_DP(SGN, 3, 5, 7);
            }
        } else {
            V2_DP(SGN, 0, 4, 6);
            if (RT > 1) V2_DP(SGN, 1, 5, 6);
            /* more than 2 row tiles: A tiles are reused once their products are issued */
            if (RT > 2) {
                KT_TILE_LOAD(4, a2 + ko, st);
                V2_DP(SGN, 2, 4, 6);
            }
            if (RT > 3) {
                KT_TILE_LOAD(5, a3 + ko, st);
                V2_DP(SGN, 3, 5, 6);
            }
        }
    }
}

static void v2_dots(const v2_ctx *x, const v2_unit *u) {
#define V2_SHAPE(RT, PT)                                  \
    if (u->rt == (RT) && u->pt == (PT)) {                 \
        if (x->sgn) v2_dots_shape(RT, PT, 1, x, u);       \
        else v2_dots_shape(RT, PT, 0, x, u);              \
        return;                                           \
    }
    V2_SHAPE(2, 2)
    V2_SHAPE(1, 2)
    V2_SHAPE(2, 1)
    V2_SHAPE(1, 1)
    V2_SHAPE(4, 1)
    V2_SHAPE(3, 1)
#undef V2_SHAPE
}

/* C tiles of a unit -> cbuf, tile t at int32 offset 256 t (16 rows of 16). */
static void v2_store(const v2_unit *u, int32_t *cbuf) {
#define V2_ST(t) KT_TILE_STORE(t, cbuf + 256 * (t), 64)
    KT_IF_TILE(u->rt * u->pt, V2_ST);
#undef V2_ST
}

/* 16 rows of one C tile into out: o = (c - zero * gs) * (s * xs) [+ m * (gs * xs)] (+ o unless
 * first). ZFIX / MIN are constants; the operation order is variant 1's. */
KT_INLINE void v2_rescale_tile(const int ZFIX, const int MIN, const int32_t *c, float *o, int64_t ldo, __m512 sv,
                               __m512 mv, const float *xs, const int32_t *gs, int32_t gstride, int32_t zero,
                               int first) {
    for (int r = 0; r < 16; r++) {
        const int64_t at = (int64_t)r * gstride;
        const float xsr = xs[at];
        float *orow = o + r * ldo;
        __m512i ci = _mm512_load_si512(c + 16 * r);
        if (ZFIX) ci = _mm512_sub_epi32(ci, _mm512_set1_epi32(zero * gs[at]));
        __m512 acc = first ? _mm512_setzero_ps() : _mm512_loadu_ps(orow);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ci), _mm512_mul_ps(sv, _mm512_set1_ps(xsr)), acc);
        if (MIN) acc = _mm512_fmadd_ps(mv, _mm512_set1_ps((float)gs[at] * xsr), acc);
        _mm512_storeu_ps(orow, acc);
    }
}

KT_INLINE void v2_rescale_fmt(const int ZFIX, const int MIN, const v2_ctx *x, const v2_unit *u, const int32_t *cbuf) {
    for (int pi = 0; pi < u->pt; pi++) {
        const __m512 sv = ld_scales16(u->s[pi], x->scale_f32);
        const __m512 mv = MIN ? ld_scales16(u->mn[pi], x->scale_f32) : _mm512_setzero_ps();
        for (int ri = 0; ri < u->rt; ri++) {
            const int64_t r16 = 16 * (int64_t)ri;
            v2_rescale_tile(ZFIX, MIN, cbuf + 256 * (ri * u->pt + pi), u->o + r16 * x->ldo + 16 * pi, x->ldo, sv, mv,
                            u->xs + r16 * x->gstride, u->gs + r16 * x->gstride, x->gstride, x->zero, u->first);
        }
    }
}

static void v2_rescale(const v2_ctx *x, const v2_unit *u, const int32_t *cbuf) {
    if (x->zero) v2_rescale_fmt(1, 0, x, u, cbuf);
    else if (x->has_min) v2_rescale_fmt(0, 1, x, u, cbuf);
    else v2_rescale_fmt(0, 0, x, u, cbuf);
}


static void gemm_amx_v2(const kt_fmt *fmt, const kt_mat *W, int32_t slot, int32_t panel0, int32_t npanels,
                        const kt_act *A, int32_t row0, int32_t M, float *out, int64_t ldo, uint8_t *scratch) {
    const int32_t k = W->k, G = W->group, ng = W->ngroups;
    const int is4 = fmt->format == KT_FMT_INT4;
    const int32_t kb = G % 64 == 0 ? 64 : 32; /* groups are multiples of 32 */
    const v2_ctx x = {.kb = kb, .nch = G / kb, .gstride = A->gstride, .zero = is4 ? 0 : fmt->zero, .sgn = is4,
                      .has_min = W->zmin != NULL, .scale_f32 = fmt->scale_f32, .ast = (long)A->stride, .ldo = ldo,
                      .pf = atomic_load_explicit(&kt_prefetch_bytes, memory_order_relaxed),
                      .pf_end = W->w + slot * W->w_slot + (int64_t)(panel0 + npanels) * W->w_panel};
    const int64_t sstep = fmt->scale_f32 ? 64 : 32, gbytes = is4 ? (int64_t)G * 8 : (int64_t)G * 16;
    /* scratch: unpacked int4 groups of up to 2 panels (2 * G * 16 <= k * 16 bytes), then cbuf */
    uint8_t *ubuf = scratch;
    int32_t *cbuf = (int32_t *)(scratch + kt_round_up((int64_t)k * 16, 64));
    const int pair_ok = !is4 || 2 * G <= k;
    amx_configure(kb == 64 ? 1 : 2);
    v2_unit pend;
    int have = 0;
    for (int32_t i = 0; i < npanels;) {
        const int pt = pair_ok && npanels - i >= 2 ? 2 : 1;
        const uint8_t *wp[2], *sp[2], *mp[2];
        for (int q = 0; q < 2; q++) {
            const int64_t p = panel0 + i + (q < pt ? q : 0);
            wp[q] = W->w + slot * W->w_slot + p * W->w_panel;
            sp[q] = W->scale + slot * W->s_slot + p * W->s_panel;
            mp[q] = W->zmin ? W->zmin + slot * W->s_slot + p * W->s_panel : NULL;
        }
        for (int32_t g = 0; g < ng; g++) {
            v2_unit u = {.first = g == 0, .pt = pt};
            for (int q = 0; q < pt; q++) {
                if (is4) {
                    uint8_t *dst = ubuf + (int64_t)q * G * 16;
                    if (fmt->zero) unpack_int4(1, wp[q] + g * gbytes, G, dst, x.pf, x.pf_end);
                    else unpack_int4(0, wp[q] + g * gbytes, G, dst, x.pf, x.pf_end);
                    u.b[q] = dst;
                } else {
                    u.b[q] = wp[q] + g * gbytes;
                }
                u.s[q] = sp[q] + g * sstep;
                u.mn[q] = mp[q] ? mp[q] + g * sstep : NULL;
            }
            for (int32_t m0 = 0; m0 + 16 <= M; m0 += 16 * u.rt) {
                const int64_t row = row0 + m0;
                u.rt = KT_MIN(pt == 2 ? 2 : 4, (M - m0) / 16); /* the loop steps by it (>= 1) */
                u.a = A->data + row * A->stride + (int64_t)g * G;
                u.xs = A->scale + row * A->gstride + g;
                u.gs = A->gsum + row * A->gstride + g;
                u.o = out + (int64_t)m0 * ldo + 16 * i;
                u.fetch = m0 == 0 && x.pf;
                if (have) v2_store(&pend, cbuf); /* frees the C tiles for u */
                v2_dots(&x, &u);
                if (have) v2_rescale(&x, &pend, cbuf); /* overlaps u's tile work */
                pend = u, have = 1;
            }
        }
        i += pt;
    }
    if (have) {
        v2_store(&pend, cbuf);
        v2_rescale(&x, &pend, cbuf);
    }
}

/* KT_AMX_GEMM=1: variant 1 for every format; otherwise (unset, 2) variant 2 for int8/int4. Read
 * once per process, so that one benchmark run can compare both (one process each). */
static int amx_gemm_variant(void) {
    static _Atomic int cached; /* 0: not read yet */
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (!v) {
        const char *env = getenv("KT_AMX_GEMM");
        v = env && atoi(env) == 1 ? 1 : 2;
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return v;
}

static void KT_FN(gemm_amx)(const kt_fmt *fmt, const kt_mat *W, int32_t slot, int32_t panel0, int32_t npanels,
                            const kt_act *A, int32_t row0, int32_t M, float *out, int64_t ldo, uint8_t *scratch) {
    if (fmt->format == KT_FMT_BF16 || amx_gemm_variant() == 1)
        gemm_amx_v1(fmt, W, slot, panel0, npanels, A, row0, M, out, ldo, scratch);
    else
        gemm_amx_v2(fmt, W, slot, panel0, npanels, A, row0, M, out, ldo, scratch);
}
#endif /* KT_LEVEL == 3 */

/* ================================================================== benchmark loops */

static volatile uint64_t kt_sink;

static uint64_t KT_FN(read_sum)(const uint8_t *p, int64_t n) {
#if KT_LEVEL >= 2
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
    int64_t i = 0;
    for (; i + 256 <= n; i += 256) {
        a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
        b = _mm512_xor_si512(b, _mm512_loadu_si512(p + i + 64));
        c = _mm512_xor_si512(c, _mm512_loadu_si512(p + i + 128));
        d = _mm512_xor_si512(d, _mm512_loadu_si512(p + i + 192));
    }
    for (; i + 64 <= n; i += 64) a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
    a = _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, d));
    return (uint64_t)_mm512_reduce_add_epi64(a);
#else
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)(p + i)));
        b = _mm256_xor_si256(b, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        c = _mm256_xor_si256(c, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        d = _mm256_xor_si256(d, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    for (; i + 32 <= n; i += 32) a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)(p + i)));
    a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
    return (uint64_t)_mm256_extract_epi64(a, 0) ^ (uint64_t)_mm256_extract_epi64(a, 3);
#endif
}

static int64_t KT_FN(peak_int8)(int64_t iters) {
#if KT_LEVEL == 3
    amx_configure(1);
    KT_TILE_ZERO(0);
    KT_TILE_ZERO(1);
    KT_TILE_ZERO(2);
    KT_TILE_ZERO(3);
    KT_TILE_ZERO(4);
    KT_TILE_ZERO(6);
    for (int64_t i = 0; i < iters; i++) {
        KT_TILE_DPBSUD(0, 4, 6);
        KT_TILE_DPBSUD(1, 4, 6);
        KT_TILE_DPBSUD(2, 4, 6);
        KT_TILE_DPBSUD(3, 4, 6);
    }
    return iters * 4 * 16 * 16 * 64 * 2;
#elif KT_LEVEL == 2
    __m512i acc[8];
    const __m512i w = _mm512_set1_epi32(0x01020304), x = _mm512_set1_epi32(0x05060708);
    for (int j = 0; j < 8; j++) acc[j] = _mm512_set1_epi32(j);
    for (int64_t i = 0; i < iters; i++)
        for (int j = 0; j < 8; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], w, x);
    __m512i s = acc[0];
    for (int j = 1; j < 8; j++) s = _mm512_add_epi32(s, acc[j]);
    kt_sink = (uint64_t)_mm512_reduce_add_epi32(s);
    return iters * 8 * 64 * 2;
#else
    __m256i acc[4];
    const __m256i w = _mm256_set1_epi32(0x01020304), x = _mm256_set1_epi32(0x05060708), ones = _mm256_set1_epi16(1);
    for (int j = 0; j < 4; j++) acc[j] = _mm256_set1_epi32(j);
    for (int64_t i = 0; i < iters; i++)
        for (int j = 0; j < 4; j++) acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(acc[0], acc[1]), _mm256_add_epi32(acc[2], acc[3]));
    kt_sink = (uint64_t)_mm256_extract_epi32(s, 0);
    return iters * 4 * 32 * 2;
#endif
}

const kt_isa_ops KT_OPS = {
    .level = KT_LEVEL,
    .quantize = KT_FN(quantize),
    .gemm = KT_FN(gemm),
#if KT_LEVEL == 3
    .gemm_amx = KT_FN(gemm_amx),
    .tile_release = KT_FN(tile_release),
#else
    .gemm_amx = NULL,
    .tile_release = NULL,
#endif
    .act_mul = KT_FN(act_mul),
    .reduce = KT_FN(reduce),
    .store_rows = KT_FN(store_rows),
    .read_sum = KT_FN(read_sum),
    .peak_int8 = KT_FN(peak_int8),
};
