/* AVX2 kernels (KTL_ISA == 1: AVX2, FMA, F16C). Included by kernels.c only.
 *
 * Tiles of RM = 4 weight rows x RN = 2 tokens (16 ymm registers).
 *  - float types: 8 weights per step converted to fp32, FMA; a scalar tail for k % 8.
 *  - 32-element types: one block per ymm; vpmaddubsw (unsigned codes x int8 activations) and
 *    vpmaddwd with ones give eight int32 partial sums; the code offset is added as
 *    -offset * (block sum of the activations) in lane 0. Q8_0's signed codes use the sign trick
 *    (|w| x sign(x, w)) instead. Scaled by d_w * d_x per block, accumulated in fp32.
 *  - K types: eight ymm of unsigned codes per 256 block; vpmaddubsw then vpmaddwd with the
 *    per-16/32 integer scales; offsets and mins from the 16-sums of the activations.
 */
#include <immintrin.h>

#define RM 4
#define RN 2

KTL_INLINE float h2f(const uint8_t *p) { return _cvtsh_ss(ktl_ld16(p)); }

KTL_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

KTL_INLINE int32_t hsum256_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

/* ---------------------------------------------------------------- activation quantisation */

/* Same results as the scalar version (see kern_avx512.h for the NaN argument). */
KTL_INLINE void quant_block(const float *x, int n, int8_t *q, float *d_out, int32_t *sum16) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) amax = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), amax);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    float am = _mm_cvtss_f32(m);
    float idf = am > 0.0f ? 127.0f / am : 0.0f;
    __m256 id = _mm256_set1_ps(idf), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    for (int i = 0; i < n; i += 16) {
        __m256i iv[2];
        for (int h = 0; h < 2; h++) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * h), id);
            v = _mm256_max_ps(lo, _mm256_min_ps(hi, v));
            v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));
            iv[h] = _mm256_cvtps_epi32(v);
        }
        __m256i w16 = _mm256_packs_epi32(iv[0], iv[1]);      /* a0-3 b0-3 | a4-7 b4-7 */
        w16 = _mm256_permute4x64_epi64(w16, _MM_SHUFFLE(3, 1, 2, 0)); /* a0-7 b0-7 */
        __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
        _mm_storeu_si128((__m128i *)(q + i), b8);
        sum16[i / 16] = hsum256_epi32(_mm256_add_epi32(iv[0], iv[1]));
    }
    *d_out = am / 127.0f;
}

KTL_INLINE uint64_t read_sum_isa(const uint8_t *p, int64_t n, int64_t *done) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    *done = i;
    __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
    __m128i h = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return (uint64_t)_mm_cvtsi128_si64(h) + (uint64_t)_mm_extract_epi64(h, 1);
}

/* ---------------------------------------------------------------- float weights */

KTL_INLINE __m256 load8_f32(const uint8_t *p) { return _mm256_loadu_ps((const float *)p); }
KTL_INLINE __m256 load8_f16(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
KTL_INLINE __m256 load8_bf16(const uint8_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
KTL_INLINE float load1_f32(const uint8_t *p) { return ktl_bits_f32(ktl_ld32(p)); }
KTL_INLINE float load1_f16(const uint8_t *p) { return h2f(p); }
KTL_INLINE float load1_bf16(const uint8_t *p) { return ktl_bf2f(ktl_ld16(p)); }

#define DEFINE_TILE_FLOAT(name, ESZ)                                                               \
    KTL_INLINE void tile_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, \
                                int rm, int rn, float *c) {                                        \
        __m256 acc[RM][RN];                                                                        \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) acc[i][j] = _mm256_setzero_ps();                          \
        int64_t e = a->k0;                                                                         \
        for (; e + 8 <= a->k1; e += 8) {                                                           \
            __m256 wv[RM];                                                                         \
            for (int i = 0; i < rm; i++) wv[i] = load8_##name(w + i * a->row_bytes + e * (ESZ));   \
            for (int j = 0; j < rn; j++) {                                                         \
                __m256 xv = _mm256_loadu_ps((const float *)x[j] + e);                              \
                for (int i = 0; i < rm; i++) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);    \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) {                                                         \
                float s = hsum256(acc[i][j]);                                                      \
                for (int64_t t = e; t < a->k1; t++)                                                \
                    s += load1_##name(w + i * a->row_bytes + t * (ESZ)) * ((const float *)x[j])[t]; \
                c[i * RN + j] = s;                                                                 \
            }                                                                                      \
    }

DEFINE_TILE_FLOAT(f32, 4)
DEFINE_TILE_FLOAT(f16, 2)
DEFINE_TILE_FLOAT(bf16, 2)

/* ---------------------------------------------------------------- 32-element types */

typedef struct {
    __m256i q; /* codes (unsigned; signed int8 for Q8_0) */
    float d, m;
} bdec;

KTL_INLINE __m256i nibbles(const uint8_t *qs) {
    __m128i v = _mm_loadu_si128((const __m128i *)qs);
    __m128i m4 = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
}

/* bit i of the 32-bit word -> byte i = 16 */
KTL_INLINE __m256i high_bits(uint32_t bits) {
    __m256i v = _mm256_set1_epi32((int)bits);
    v = _mm256_shuffle_epi8(v, _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL));
    __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
    return _mm256_and_si256(v, _mm256_set1_epi8(16));
}

KTL_INLINE void bdec_q4_0(const uint8_t *b, bdec *o) { o->q = nibbles(b + Q4_0_QS); o->d = h2f(b); }
KTL_INLINE void bdec_q4_1(const uint8_t *b, bdec *o) {
    o->q = nibbles(b + Q4_1_QS);
    o->d = h2f(b);
    o->m = h2f(b + Q4_1_M);
}
KTL_INLINE void bdec_q5_0(const uint8_t *b, bdec *o) {
    o->q = _mm256_or_si256(nibbles(b + Q5_0_QS), high_bits(ktl_ld32(b + Q5_0_QH)));
    o->d = h2f(b);
}
KTL_INLINE void bdec_q5_1(const uint8_t *b, bdec *o) {
    o->q = _mm256_or_si256(nibbles(b + Q5_1_QS), high_bits(ktl_ld32(b + Q5_1_QH)));
    o->d = h2f(b);
    o->m = h2f(b + Q5_1_M);
}
KTL_INLINE void bdec_q8_0(const uint8_t *b, bdec *o) {
    o->q = _mm256_loadu_si256((const __m256i *)(b + Q8_0_QS));
    o->d = h2f(b);
}

/* SIGNED: Q8_0 (sign trick, no offset); else unsigned codes with offset 1 << SHIFT (or none) */
#define DEFINE_TILE32(name, BS, SHIFT, HAS_MIN, SIGNED)                                            \
    KTL_INLINE void tile_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, \
                                int rm, int rn, float *c) {                                        \
        __m256 acc[RM][RN];                                                                        \
        float macc[RM][RN];                                                                        \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) {                                                         \
                acc[i][j] = _mm256_setzero_ps();                                                   \
                macc[i][j] = 0.0f;                                                                 \
            }                                                                                      \
        const __m256i ones = _mm256_set1_epi16(1);                                                 \
        for (int64_t b = a->k0 / KTL_QK; b < a->k1 / KTL_QK; b++) {                                \
            float dx[RN];                                                                          \
            int32_t sx[RN];                                                                        \
            for (int j = 0; j < rn; j++) {                                                         \
                dx[j] = ((const float *)(x[j] + a->lay.d_off))[b];                                 \
                sx[j] = ((const int32_t *)(x[j] + a->lay.s_off))[b];                               \
            }                                                                                      \
            for (int i = 0; i < rm; i++) {                                                         \
                bdec dw;                                                                           \
                bdec_##name(w + i * a->row_bytes + b * (BS), &dw);                                 \
                for (int j = 0; j < rn; j++) {                                                     \
                    __m256i xq = _mm256_loadu_si256((const __m256i *)(x[j] + KTL_QK * b));         \
                    __m256i p16 = SIGNED ? _mm256_maddubs_epi16(_mm256_sign_epi8(dw.q, dw.q),      \
                                                                _mm256_sign_epi8(xq, dw.q))        \
                                         : _mm256_maddubs_epi16(dw.q, xq);                         \
                    __m256i dot = _mm256_madd_epi16(p16, ones);                                    \
                    if (!SIGNED && !HAS_MIN)                                                       \
                        dot = _mm256_sub_epi32(dot, _mm256_zextsi128_si256(_mm_cvtsi32_si128(sx[j] * (1 << SHIFT)))); \
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw.d * dx[j]), acc[i][j]); \
                    if (HAS_MIN) macc[i][j] += dw.m * dx[j] * (float)sx[j];                        \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) c[i * RN + j] = hsum256(acc[i][j]) + macc[i][j];          \
    }

DEFINE_TILE32(q4_0, 18, 3, 0, 0)
DEFINE_TILE32(q4_1, 20, 0, 1, 0)
DEFINE_TILE32(q5_0, 22, 4, 0, 0)
DEFINE_TILE32(q5_1, 24, 0, 1, 0)
DEFINE_TILE32(q8_0, 34, 0, 0, 1)

/* ---------------------------------------------------------------- K types */

typedef struct {
    __m256i q[8];  /* 256 unsigned codes in element order */
    __m256i sc[8]; /* int16 scale of each code pair */
    __m256i corr;  /* int16 per 16 codes: offset*scale, or the min */
    float d, dmin;
} kdec;

/* int16 scale of 32-groups: the same in all 16 lanes */
KTL_INLINE void scales32(uint64_t sc8, kdec *o) {
    for (int s = 0; s < 8; s++) o->sc[s] = _mm256_set1_epi16((short)((sc8 >> (8 * s)) & 0xff));
}

/* int16 scales of 16-groups (16 values in s16): ymm s gets group 2s in its low half, 2s+1 high */
KTL_INLINE void scales16(__m256i s16, kdec *o) {
    /* each int32 lane: the int16 of group g in both halves */
    __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16));
    __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16, 1));
    lo = _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(lo, 16));
    hi = _mm256_or_si256(_mm256_and_si256(hi, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(hi, 16));
    for (int s = 0; s < 8; s++) {
        int g = 2 * (s & 3);
        __m256i idx = _mm256_setr_epi32(g, g, g, g, g + 1, g + 1, g + 1, g + 1);
        o->sc[s] = _mm256_permutevar8x32_epi32(s < 4 ? lo : hi, idx);
    }
}

KTL_INLINE void kdec_q45(const uint8_t *b, const uint8_t *qs, kdec *o) {
    __m256i m4 = _mm256_set1_epi8(15);
    for (int c = 0; c < 4; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        o->q[2 * c] = _mm256_and_si256(v, m4);
        o->q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
    uint64_t sc8, mn8;
    ktl_k4_scales(b + Q4_K_SC, &sc8, &mn8);
    scales32(sc8, o);
    __m128i m = _mm_cvtsi64_si128((long long)mn8);
    o->corr = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m));
    o->d = h2f(b);
    o->dmin = h2f(b + Q4_K_DMIN);
}

KTL_INLINE void kdec_q4_k(const uint8_t *b, kdec *o) { kdec_q45(b, b + Q4_K_QS, o); }

KTL_INLINE void kdec_q5_k(const uint8_t *b, kdec *o) {
    kdec_q45(b, b + Q5_K_QS, o);
    __m256i h = _mm256_loadu_si256((const __m256i *)(b + Q5_K_QH));
    __m256i sixteen = _mm256_set1_epi8(16);
    for (int s = 0; s < 8; s++) {
        __m256i hb = s <= 4 ? _mm256_slli_epi16(h, 4 - s) : _mm256_srli_epi16(h, s - 4);
        o->q[s] = _mm256_or_si256(o->q[s], _mm256_and_si256(hb, sixteen));
    }
}

KTL_INLINE void kdec_q6_k(const uint8_t *b, kdec *o) {
    __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; h++) {
        __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + Q6_K_QL + 64 * h));
        __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + Q6_K_QL + 64 * h + 32));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + Q6_K_QH + 32 * h));
        o->q[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
        o->q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
        o->q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m30));
        o->q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                          _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
    }
    __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + Q6_K_SC)));
    scales16(s16, o);
    o->corr = _mm256_slli_epi16(s16, 5);
    o->d = h2f(b + Q6_K_D);
    o->dmin = 0.0f;
}

KTL_INLINE __m256i two_bits(const uint8_t *qs, int s) {
    __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * (s >> 2)));
    return _mm256_and_si256(_mm256_srli_epi16(v, 2 * (s & 3)), _mm256_set1_epi8(3));
}

KTL_INLINE void kdec_q3_k(const uint8_t *b, kdec *o) {
    __m256i hm = _mm256_loadu_si256((const __m256i *)(b + Q3_K_HM));
    __m256i four = _mm256_set1_epi8(4);
    for (int s = 0; s < 8; s++) {
        int bit = 4 * (s >> 2) + (s & 3);
        __m256i hb = bit <= 2 ? _mm256_slli_epi16(hm, 2 - bit) : _mm256_srli_epi16(hm, bit - 2);
        o->q[s] = _mm256_or_si256(two_bits(b + Q3_K_QS, s), _mm256_and_si256(hb, four));
    }
    uint8_t sc[16];
    ktl_k3_scales(b + Q3_K_SC, sc);
    __m256i s16 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)sc)), _mm256_set1_epi16(32));
    scales16(s16, o);
    o->corr = _mm256_slli_epi16(s16, 2);
    o->d = h2f(b + Q3_K_D);
    o->dmin = 0.0f;
}

KTL_INLINE void kdec_q2_k(const uint8_t *b, kdec *o) {
    for (int s = 0; s < 8; s++) o->q[s] = two_bits(b + Q2_K_QS, s);
    __m128i v = _mm_loadu_si128((const __m128i *)(b + Q2_K_SC));
    __m128i m4 = _mm_set1_epi8(15);
    scales16(_mm256_cvtepu8_epi16(_mm_and_si128(v, m4)), o);
    o->corr = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m4));
    o->d = h2f(b + Q2_K_D);
    o->dmin = h2f(b + Q2_K_DMIN);
}

KTL_INLINE __m256 kdot(const kdec *w, const int8_t *xq, const int16_t *bs, float dx, int has_min, __m256 acc) {
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int s = 0; s < 8; s += 2) {
        __m256i p0 = _mm256_maddubs_epi16(w->q[s], _mm256_loadu_si256((const __m256i *)(xq + 32 * s)));
        __m256i p1 = _mm256_maddubs_epi16(w->q[s + 1], _mm256_loadu_si256((const __m256i *)(xq + 32 * s + 32)));
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, w->sc[s]));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, w->sc[s + 1]));
    }
    __m256i isum = _mm256_add_epi32(s0, s1);
    __m256i corr = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)bs), w->corr);
    if (!has_min) {
        isum = _mm256_sub_epi32(isum, corr);
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(w->d * dx), acc);
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(w->d * dx), acc);
    return _mm256_fnmadd_ps(_mm256_cvtepi32_ps(corr), _mm256_set1_ps(w->dmin * dx), acc);
}

#define DEFINE_TILEK(name, BS, HAS_MIN)                                                            \
    KTL_INLINE void tile_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, \
                                int rm, int rn, float *c) {                                        \
        __m256 acc[RM][RN];                                                                        \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) acc[i][j] = _mm256_setzero_ps();                          \
        for (int64_t b = a->k0 / KTL_QKK; b < a->k1 / KTL_QKK; b++) {                              \
            for (int i = 0; i < rm; i++) {                                                         \
                kdec dw;                                                                           \
                kdec_##name(w + i * a->row_bytes + b * (BS), &dw);                                 \
                for (int j = 0; j < rn; j++) {                                                     \
                    const float dx = ((const float *)(x[j] + a->lay.d_off))[b];                    \
                    const int16_t *bs = (const int16_t *)(x[j] + a->lay.s_off) + 16 * b;           \
                    acc[i][j] = kdot(&dw, (const int8_t *)x[j] + KTL_QKK * b, bs, dx, HAS_MIN, acc[i][j]); \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) c[i * RN + j] = hsum256(acc[i][j]);                       \
    }

DEFINE_TILEK(q2_k, 84, 1)
DEFINE_TILEK(q3_k, 110, 0)
DEFINE_TILEK(q4_k, 144, 1)
DEFINE_TILEK(q5_k, 176, 1)
DEFINE_TILEK(q6_k, 210, 0)

DEFINE_GEMM(f32, RM, RN)
DEFINE_GEMM(f16, RM, RN)
DEFINE_GEMM(bf16, RM, RN)
DEFINE_GEMM(q4_0, RM, RN)
DEFINE_GEMM(q4_1, RM, RN)
DEFINE_GEMM(q5_0, RM, RN)
DEFINE_GEMM(q5_1, RM, RN)
DEFINE_GEMM(q8_0, RM, RN)
DEFINE_GEMM(q2_k, RM, RN)
DEFINE_GEMM(q3_k, RM, RN)
DEFINE_GEMM(q4_k, RM, RN)
DEFINE_GEMM(q5_k, RM, RN)
DEFINE_GEMM(q6_k, RM, RN)
