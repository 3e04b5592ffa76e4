/* AVX-512 kernels (KTL_ISA == 2: F, BW, VL, VNNI). Included by kernels.c only.
 *
 * Tiles of RM = 4 weight rows x RN = 4 tokens (K types: 1 row x 8 tokens), one zmm accumulator
 * each. With one token the quantised types Q4_0..Q8_0, Q4_K and Q6_K run gemv_<name> (one row at
 * a time, every 4 rows reduced together; Q8_0 in groups of 8 blocks, see "Q8_0, one token";
 * Q4_K/Q6_K with a cheaper block dot, see "K types, one token"); the float types, Q2_K, Q3_K and Q5_K walk 1 x 1 tiles (kernels.c).
 *  - float types: 16 weights per step converted to fp32 (F16 vcvtph2ps, BF16 a shift), FMA.
 *  - 32-element types: two blocks per zmm; codes decoded to unsigned bytes in element order,
 *    vpdpbusd with the int8 activations; the code offset (8, 16, or 128 for Q8_0, whose int8
 *    codes are flipped to unsigned by xor 0x80) is folded into the dot's start value as
 *    -offset * (block sum of the activations) in one lane per block; the result is scaled by
 *    d_w * d_x per block lane and accumulated in fp32. Q4_1/Q5_1 add m * d_x * block sum.
 *  - K types: a 256 block is four zmm of unsigned codes (Q4_K/Q5_K in the group order
 *    0 2 1 3 4 6 5 7 in which the nibbles unpack, matched by the activations); vpmaddubsw (codes <= 63, so no
 *    saturation) then vpdpwssd with the per-16/32 integer scales gives one int32 sum per block;
 *    offsets (Q3_K 4, Q6_K 32) and mins (Q2_K, Q4_K, Q5_K) come from the activations' 16-sums:
 *    sum_g corr[g] * bsum[g] by vpmaddwd. One fp32 FMA per block and token.
 */
#include <immintrin.h>

#define RM 4
#define RN 4
/* K types: one weight row x 8 tokens (a decoded 256 block is 8 zmm, used for 8 tokens; 8
 * accumulators; 4 x 4 spilled its accumulators) */
#ifndef KRM
#define KRM 1
#endif
#ifndef KRN
#define KRN 8
#endif

/* Software prefetch this many bytes ahead in each weight row (0: leave it to the hardware),
 * into L2 (hint T1). On the 16-core Xeon GPU host (bench/sweep_gemv.py, 14 threads, session 6;
 * GB/s gate_up/down, Q4_K then Q8_0): none 64.7/66.2 75.7/71.4; 4 KiB into L1 (sessions 3-5)
 * 88.7/90.9 86.7/99.2; 4 KiB into L2 88.7/88.1 95.2/101.1; 8 KiB into L2 91.1/89.7
 * 100.5/99.4 (the host is noisy: about +-10% between runs). PREFETCH_SPAN(p, n) prefetches
 * the data n bytes long at p that far ahead, one prefetch per 64 bytes: a block longer than a
 * cache line (Q4_K 144 bytes, Q6_K 210) needs 3-4 to reach every line of the stream, where one
 * per block covered about half of Q4_K's lines and a third of Q6_K's (Q4_K with one per block,
 * KTL_PREFETCH_LINES=0: 83.0/86.0 GB/s, paired fraction 0.78/0.80 against 0.86/0.89). */
#ifndef KTL_PREFETCH
#define KTL_PREFETCH 8192
#endif
#ifndef KTL_PREFETCH_HINT
#define KTL_PREFETCH_HINT _MM_HINT_T1
#endif
#ifndef KTL_PREFETCH_LINES
#define KTL_PREFETCH_LINES 1
#endif
#if KTL_PREFETCH > 0
#define PREFETCH_SPAN(p, n)                                                                        \
    do {                                                                                           \
        for (int o_ = 0; o_ < (KTL_PREFETCH_LINES ? (n) : 1); o_ += 64)                            \
            _mm_prefetch((const char *)(p) + KTL_PREFETCH + o_, KTL_PREFETCH_HINT);                \
    } while (0)
#else
#define PREFETCH_SPAN(p, n) ((void)0)
#endif

KTL_INLINE float h2f(const uint8_t *p) { return _cvtsh_ss(ktl_ld16(p)); }

KTL_INLINE __m512i idx_const(const int16_t *v) { return _mm512_loadu_si512((const void *)v); }

/* ---------------------------------------------------------------- activation quantisation */

/* lane 4L + j of the result: the sum of lanes 4L..4L+3 of a_j (the 128-bit lane L of each) */
KTL_INLINE __m512i sum4_lanes_epi32(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1)); /* a0 a1 a0 a1 */
    __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
}

/* the sums of 4 zmm of int32 -> one xmm [sum a0, sum a1, sum a2, sum a3] (one transposing
 * reduction instead of 4 horizontal ones) */
KTL_INLINE __m128i reduce4_epi32(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    __m512i s = sum4_lanes_epi32(a0, a1, a2, a3);
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* Same results as the scalar version: max(a, m) keeps m when a is NaN, min/max with the
 * constant first keep NaN, which is then replaced by 0; cvtps2dq rounds to nearest even.
 * n is 32 or a multiple of 64; the 16-sums are reduced four at a time. */
KTL_INLINE __m512i quant16(const float *x, __m512 id, int8_t *q) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x), id);
    v = _mm512_max_ps(_mm512_set1_ps(-127.0f), _mm512_min_ps(_mm512_set1_ps(127.0f), v));
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);
    __m512i iv = _mm512_cvtps_epi32(v);
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(iv));
    return iv;
}

KTL_INLINE void quant_block(const float *x, int n, int8_t *q, float *d_out, int32_t *sum16) {
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), amax);
    float am = _mm512_reduce_max_ps(amax);
    __m512 id = _mm512_set1_ps(am > 0.0f ? 127.0f / am : 0.0f);
    if (n == 32) {
        __m512i z = _mm512_setzero_si512(), a0 = quant16(x, id, q), a1 = quant16(x + 16, id, q + 16);
        _mm_storel_epi64((__m128i *)sum16, reduce4_epi32(a0, a1, z, z));
    }
    for (int i = 0; n >= 64 && i < n; i += 64) {
        __m512i a0 = quant16(x + i, id, q + i), a1 = quant16(x + i + 16, id, q + i + 16);
        __m512i a2 = quant16(x + i + 32, id, q + i + 32), a3 = quant16(x + i + 48, id, q + i + 48);
        _mm_storeu_si128((__m128i *)(sum16 + i / 16), reduce4_epi32(a0, a1, a2, a3));
    }
    *d_out = am / 127.0f;
}

KTL_INLINE uint64_t read_sum_isa(const uint8_t *p, int64_t n, int64_t *done) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 256 <= n; i += 256) {
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512((const void *)(p + i)));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512((const void *)(p + i + 64)));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512((const void *)(p + i + 128)));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512((const void *)(p + i + 192)));
    }
    *done = i;
    return (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
}

/* ---------------------------------------------------------------- float weights */

KTL_INLINE __m512 load_f32(const uint8_t *p, __mmask16 m, int full) {
    return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
KTL_INLINE __m512 load_f16(const uint8_t *p, __mmask16 m, int full) {
    __m256i h = full ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(m, p);
    return _mm512_cvtph_ps(h);
}
KTL_INLINE __m512 load_bf16(const uint8_t *p, __mmask16 m, int full) {
    __m256i h = full ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#define DEFINE_TILE_FLOAT(name, ESZ)                                                               \
    KTL_INLINE void float_step_##name(const ktl_gemm_args *a, const uint8_t *w,                    \
                                      const uint8_t *const *x, int rm, int rn, int64_t e,          \
                                      __mmask16 m, int full, __m512 acc[RM][RN]) {                 \
        __m512 wv[RM];                                                                             \
        for (int i = 0; i < rm; i++) PREFETCH_SPAN(w + i * a->row_bytes + e * (ESZ), 16 * (ESZ));             \
        for (int i = 0; i < rm; i++) wv[i] = load_##name(w + i * a->row_bytes + e * (ESZ), m, full); \
        for (int j = 0; j < rn; j++) {                                                             \
            __m512 xv = load_f32(x[j] + e * 4, m, full);                                           \
            for (int i = 0; i < rm; i++) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);        \
        }                                                                                          \
    }                                                                                              \
    KTL_INLINE void tile_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, \
                                int rm, int rn, float *c) {                                        \
        __m512 acc[RM][RN];                                                                        \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) acc[i][j] = _mm512_setzero_ps();                          \
        int64_t e = a->k0;                                                                         \
        for (; e + 16 <= a->k1; e += 16) float_step_##name(a, w, x, rm, rn, e, 0xffff, 1, acc);    \
        if (e < a->k1) float_step_##name(a, w, x, rm, rn, e, (__mmask16)((1u << (a->k1 - e)) - 1), 0, acc); \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) c[i * RN + j] = _mm512_reduce_add_ps(acc[i][j]);          \
    }

DEFINE_TILE_FLOAT(f32, 4)
DEFINE_TILE_FLOAT(f16, 2)
DEFINE_TILE_FLOAT(bf16, 2)

/* ---------------------------------------------------------------- one token (GEMV) */

/* the sums of 4 zmm -> one xmm [sum a0, sum a1, sum a2, sum a3] */
KTL_INLINE __m128 reduce4_ps(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1)); /* a0 a1 a0 a1 */
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* rows r..r+rm-1 (rm <= 4) of the one token, as store_tile does it: (alpha *) sum, (+=) */
KTL_INLINE void store_row_sums(const ktl_gemm_args *a, int64_t r, int rm, __m128 sums) {
    float *o = a->out + (a->orow ? (int64_t)a->orow[0] : 0) * a->out_stride + r;
    __mmask8 m = (__mmask8)((1u << rm) - 1);
    if (a->alpha) sums = _mm_mul_ps(sums, _mm_set1_ps(a->alpha[0]));
    if (a->accumulate) sums = _mm_add_ps(_mm_maskz_loadu_ps(m, o), sums);
    _mm_mask_storeu_ps(o, m, sums);
}

/* gemv_<name>(args, r0, r1): one token, rows one at a time (one sequential stream) from
 * row1_<name>(args, row, x) -> the row's lane sums; every 4 rows reduced and stored together
 * (one transposing reduction instead of 4 horizontal ones: the tail of a short row, e.g. the
 * 3 blocks of a 768-value row, cost as much as a block). */
#define DEFINE_GEMV_ROWS(name)                                                                     \
    static void gemv_##name(const ktl_gemm_args *args, int64_t r0, int64_t r1) {                   \
        ktl_gemm_args whole = *args; /* the row sums run over all k values */                     \
        whole.k0 = 0;                                                                              \
        whole.k1 = args->k;                                                                        \
        const ktl_gemm_args *a = &whole;                                                           \
        const uint8_t *x = act_row(a, 0);                                                          \
        for (int64_t r = r0; r < r1; r += 4) {                                                     \
            int rm = r1 - r < 4 ? (int)(r1 - r) : 4;                                               \
            __m512 acc[4];                                                                         \
            for (int i = 0; i < 4; i++)                                                            \
                acc[i] = i < rm ? row1_##name(a, a->w + (r + i) * a->row_bytes, x) : _mm512_setzero_ps(); \
            store_row_sums(a, r, rm, reduce4_ps(acc[0], acc[1], acc[2], acc[3]));                  \
        }                                                                                          \
    }

/* ---------------------------------------------------------------- 32-element types, two blocks */

typedef struct {
    __m512i q;    /* 64 unsigned codes, element order (block 0 | block 1) */
    __m512 d, m;  /* d (and m) of block 0 in lanes 0-7, block 1 in lanes 8-15 */
} pdec;

KTL_INLINE __m512i dup8_idx(void) { return _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0); }

/* two fp16 -> [f0 x8, f1 x8] */
KTL_INLINE __m512 scale_pair(uint16_t h0, uint16_t h1) {
    __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)h0 | ((uint32_t)h1 << 16))));
    return _mm512_permutexvar_ps(dup8_idx(), _mm512_castps128_ps512(f));
}

/* 16 packed nibble bytes of each block -> 64 codes in element order */
KTL_INLINE __m512i nibbles_pair(const uint8_t *qs0, const uint8_t *qs1, int two) {
    __m128i b0 = _mm_loadu_si128((const __m128i *)qs0);
    __m128i b1 = two ? _mm_loadu_si128((const __m128i *)qs1) : _mm_setzero_si128();
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(b0), b1, 1);
    __m256i m4 = _mm256_set1_epi8(15);
    __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); /* b0lo b1lo b0hi b1hi */
    return _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));        /* b0lo b0hi b1lo b1hi */
}

KTL_INLINE __m512i high_bits_pair(const uint8_t *qh0, const uint8_t *qh1, int two) {
    uint64_t bits = (uint64_t)ktl_ld32(qh0) | (two ? (uint64_t)ktl_ld32(qh1) << 32 : 0);
    return _mm512_maskz_mov_epi8((__mmask64)bits, _mm512_set1_epi8(16));
}

#define PAIR_SCALE(b, BS, at, two) scale_pair(ktl_ld16((b) + (at)), (two) ? ktl_ld16((b) + (BS) + (at)) : 0)

KTL_INLINE void pdec_q4_0(const uint8_t *b, int two, pdec *o) {
    o->q = nibbles_pair(b + Q4_0_QS, b + 18 + Q4_0_QS, two);
    o->d = PAIR_SCALE(b, 18, 0, two);
}
KTL_INLINE void pdec_q4_1(const uint8_t *b, int two, pdec *o) {
    o->q = nibbles_pair(b + Q4_1_QS, b + 20 + Q4_1_QS, two);
    o->d = PAIR_SCALE(b, 20, 0, two);
    o->m = PAIR_SCALE(b, 20, Q4_1_M, two);
}
KTL_INLINE void pdec_q5_0(const uint8_t *b, int two, pdec *o) {
    o->q = _mm512_or_si512(nibbles_pair(b + Q5_0_QS, b + 22 + Q5_0_QS, two),
                           high_bits_pair(b + Q5_0_QH, b + 22 + Q5_0_QH, two));
    o->d = PAIR_SCALE(b, 22, 0, two);
}
KTL_INLINE void pdec_q5_1(const uint8_t *b, int two, pdec *o) {
    o->q = _mm512_or_si512(nibbles_pair(b + Q5_1_QS, b + 24 + Q5_1_QS, two),
                           high_bits_pair(b + Q5_1_QH, b + 24 + Q5_1_QH, two));
    o->d = PAIR_SCALE(b, 24, 0, two);
    o->m = PAIR_SCALE(b, 24, Q5_1_M, two);
}
KTL_INLINE void pdec_q8_0(const uint8_t *b, int two, pdec *o) {
    __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + Q8_0_QS));
    __m256i b1 = two ? _mm256_loadu_si256((const __m256i *)(b + 34 + Q8_0_QS)) : _mm256_setzero_si256();
    __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1);
    o->q = _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
    o->d = PAIR_SCALE(b, 34, 0, two);
}

KTL_INLINE __m512i tok_q(const int8_t *q, int two) {
    return two ? _mm512_loadu_si512((const void *)q) : _mm512_maskz_loadu_epi8(0xffffffffULL, q);
}

/* The token's lane vectors of block pair p: d_x of block 2p in lanes 0-7 and of 2p+1 in lanes
 * 8-15; minus the block sums in lanes 0 and 8, zeros elsewhere (one block when !two). */
KTL_INLINE void token_pair(const ktl_gemm_args *a, const uint8_t *x, int64_t p, int two, __m512 *dxv, __m512i *sv) {
    const float *d = (const float *)(x + a->lay.d_off) + 2 * p;
    const int32_t *s = (const int32_t *)(x + a->lay.s_off) + 2 * p;
    __m128i dv = two ? _mm_loadl_epi64((const __m128i *)d) : _mm_castps_si128(_mm_load_ss(d));
    __m128i ss = two ? _mm_loadl_epi64((const __m128i *)s) : _mm_cvtsi32_si128(s[0]);
    *dxv = _mm512_permutexvar_ps(dup8_idx(), _mm512_castps128_ps512(_mm_castsi128_ps(dv)));
    *sv = _mm512_maskz_permutexvar_epi32(0x0101, dup8_idx(),
                                         _mm512_castsi128_si512(_mm_sub_epi32(_mm_setzero_si128(), ss)));
}

/* Per block pair: -sum (lanes 0 and 8) shifted by log2(offset) is the dot's start value (offset
 * types), or times d_x the min term (Q4_1, Q5_1: acc -= m * (-sum * d_x)). */
#define DEFINE_TILE32(name, BS, SHIFT, HAS_MIN)                                                    \
    KTL_INLINE void pair_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, \
                                int rm, int rn, int64_t p, int two, __m512 acc[RM][RN]) {          \
        for (int i = 0; i < rm; i++) {                                                             \
            pdec dw;                                                                               \
            PREFETCH_SPAN(w + i * a->row_bytes + 2 * p * (BS), (1 + two) * (BS));                                   \
            pdec_##name(w + i * a->row_bytes + 2 * p * (BS), two, &dw);                            \
            for (int j = 0; j < rn; j++) {                                                         \
                __m512 dxv;                                                                        \
                __m512i sv;                                                                        \
                token_pair(a, x[j], p, two, &dxv, &sv);                                            \
                __m512i init = HAS_MIN ? _mm512_setzero_si512() : _mm512_slli_epi32(sv, SHIFT);    \
                __m512i dot = _mm512_dpbusd_epi32(init, dw.q, tok_q((const int8_t *)x[j] + 64 * p, two)); \
                __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw.d, dxv));       \
                if (HAS_MIN) v = _mm512_fnmadd_ps(dw.m, _mm512_mul_ps(_mm512_cvtepi32_ps(sv), dxv), v); \
                acc[i][j] = _mm512_add_ps(acc[i][j], v);                                           \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    /* acc (zeroed by the caller) += the tile's sums, per lane */                                  \
    KTL_INLINE void sums_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, \
                                int rm, int rn, __m512 acc[RM][RN]) {                              \
        /* pairs [k0/64, k1/64), and the last odd block when the part ends the row */              \
        int64_t nb = a->k / KTL_QK, p = a->k0 / 64, p1 = a->k1 / 64;                               \
        if (rm * rn <= 2) { /* small tile: two accumulator sets, even and odd pairs */             \
            __m512 acc2[RM][RN];                                                                   \
            for (int i = 0; i < rm; i++)                                                           \
                for (int j = 0; j < rn; j++) acc2[i][j] = _mm512_setzero_ps();                     \
            for (; p + 1 < p1; p += 2) {                                                           \
                pair_##name(a, w, x, rm, rn, p, 1, acc);                                           \
                pair_##name(a, w, x, rm, rn, p + 1, 1, acc2);                                      \
            }                                                                                      \
            for (int i = 0; i < rm; i++)                                                           \
                for (int j = 0; j < rn; j++) acc[i][j] = _mm512_add_ps(acc[i][j], acc2[i][j]);     \
        }                                                                                          \
        for (; p < p1; p++) pair_##name(a, w, x, rm, rn, p, 1, acc);                               \
        if ((nb & 1) && a->k1 == a->k) pair_##name(a, w, x, rm, rn, nb / 2, 0, acc);               \
    }                                                                                              \
    KTL_INLINE void tile_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, \
                                int rm, int rn, float *c) {                                        \
        __m512 acc[RM][RN];                                                                        \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) acc[i][j] = _mm512_setzero_ps();                          \
        sums_##name(a, w, x, rm, rn, acc);                                                         \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) c[i * RN + j] = _mm512_reduce_add_ps(acc[i][j]);          \
    }                                                                                              \
    /* one token: a row's lane sums (sums_, 1 x 1) */                                              \
    KTL_INLINE __m512 row1_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *x) {    \
        __m512 acc[RM][RN];                                                                        \
        acc[0][0] = _mm512_setzero_ps();                                                           \
        sums_##name(a, w, &x, 1, 1, acc);                                                          \
        return acc[0][0];                                                                          \
    }

DEFINE_TILE32(q4_0, 18, 3, 0)
DEFINE_TILE32(q4_1, 20, 0, 1)
DEFINE_TILE32(q5_0, 22, 4, 0)
DEFINE_TILE32(q5_1, 24, 0, 1)
DEFINE_TILE32(q8_0, 34, 7, 0)
DEFINE_GEMV_ROWS(q4_0)
DEFINE_GEMV_ROWS(q4_1)
DEFINE_GEMV_ROWS(q5_0)
DEFINE_GEMV_ROWS(q5_1)

/* ---------------------------------------------------------------- Q8_0, one token (GEMV) */

/* Q8_0 with one token walks groups of 8 blocks (256 values, 272 bytes): zmm j of a group holds
 * the codes of blocks 2j and 2j+1 (flipped to unsigned), one vpdpbusd each with the
 * activations; the four dot vectors are reduced to one (sum4_lanes_epi32: lane 4L + j holds
 * block 2j + L/2), which takes the offset correction (-128 * block sum, one vector per group,
 * built once per call instead of per row and pair as in row1_q8_0) and one fp32 FMA with
 * d_w * d_x (the group's 8 fp16 d converted at once, times the token's 8 d_x, spread to the
 * reduced lanes; the 8 d gathered in two GPRs). The pair tile (row1_q8_0) rebuilt the token's
 * d_x and block-sum vectors for every row and pair, converted one pair's d at a time and
 * scaled every pair (bench_gemv.py one-thread GB/s on the 2-core EPYC VM: 28.3 / 27.0 before,
 * 45.0 / 46.6 after, gate_up / down). Rows longer than Q8_GROUPS_MAX groups (the corrections live on the stack), and the last
 * k % 256 values, go through the pair tile (sums_q8_0). */
#define Q8_GROUPS_MAX 128

KTL_INLINE __m512 row_groups_q8_0(const uint8_t *w, const int8_t *xq, const float *dx, const __m512i *corr, int64_t ng) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), z = _mm512_setzero_si512();
    const __m512i lane_block = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 1, 3, 5, 7, 1, 3, 5, 7);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *b = w + 272 * g;
        PREFETCH_SPAN(b, 272);
        __m512i d[4];
        for (int j = 0; j < 4; j++) {
            const uint8_t *q = b + 68 * j + Q8_0_QS;
            __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)q)),
                                           _mm256_loadu_si256((const __m256i *)(q + 34)), 1);
            d[j] = _mm512_dpbusd_epi32(z, _mm512_xor_si512(v, flip), _mm512_load_si512((const void *)(xq + 256 * g + 64 * j)));
        }
        __m512i isum = _mm512_add_epi32(sum4_lanes_epi32(d[0], d[1], d[2], d[3]), corr[g]);
        uint64_t h0 = 0, h1 = 0;
        for (int i = 0; i < 4; i++) {
            h0 |= (uint64_t)ktl_ld16(b + 34 * i) << (16 * i);
            h1 |= (uint64_t)ktl_ld16(b + 34 * (i + 4)) << (16 * i);
            __asm__("" : "+r"(h0), "+r"(h1)); /* keep them in GPRs (vectorised, they took ~10 shuffles) */
        }
        __m256 sc = _mm256_mul_ps(_mm256_cvtph_ps(_mm_set_epi64x((long long)h1, (long long)h0)), _mm256_loadu_ps(dx + 8 * g));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_permutexvar_ps(lane_block, _mm512_castps256_ps512(sc)), acc);
    }
    return acc;
}

static void gemv_q8_0(const ktl_gemm_args *args, int64_t r0, int64_t r1) {
    ktl_gemm_args tail = *args; /* the values after the groups, by the pair tile */
    const uint8_t *x = act_row(args, 0);
    const float *dx = (const float *)(x + args->lay.d_off);
    const int32_t *s = (const int32_t *)(x + args->lay.s_off);
    int64_t ng = args->k / 256 <= Q8_GROUPS_MAX ? args->k / 256 : 0;
    __m512i corr[Q8_GROUPS_MAX]; /* [ng]: -128 * sum of block 2j in lane j, of block 2j+1 in lane 8+j */
    const __m512i sum_idx = _mm512_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0, 1, 3, 5, 7, 0, 0, 0, 0);
    for (int64_t g = 0; g < ng; g++) {
        __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(s + 8 * g)));
        corr[g] = _mm512_maskz_permutexvar_epi32(0x0f0f, sum_idx, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(v, 7)));
    }
    tail.k0 = 256 * ng;
    tail.k1 = args->k;
    for (int64_t r = r0; r < r1; r += 4) {
        int rm = r1 - r < 4 ? (int)(r1 - r) : 4;
        __m512 acc[4][RN];
        for (int i = 0; i < 4; i++) {
            const uint8_t *w = args->w + (r + i) * args->row_bytes;
            acc[i][0] = i < rm ? row_groups_q8_0(w, (const int8_t *)x, dx, corr, ng) : _mm512_setzero_ps();
            if (i < rm && tail.k0 < tail.k1) sums_q8_0(&tail, w, &x, 1, 1, &acc[i]);
        }
        store_row_sums(args, r, rm, reduce4_ps(acc[0][0], acc[1][0], acc[2][0], acc[3][0]));
    }
}

/* ---------------------------------------------------------------- K types */

typedef struct {
    __m512i q[4];   /* 256 unsigned codes, in the order of the activations */
    __m512i sc[4];  /* int16 scale of each code pair (vpdpwssd operand) */
    __m256i corr;   /* int16 per 16 codes: offset*scale, or the min */
    float d, dmin;
} kdec;

/* permutation indices (int16 lanes) */
static const int16_t G16_IDX[4][32] = {
#define R8(v) v, v, v, v, v, v, v, v
    {R8(0), R8(1), R8(2), R8(3)}, {R8(4), R8(5), R8(6), R8(7)},
    {R8(8), R8(9), R8(10), R8(11)}, {R8(12), R8(13), R8(14), R8(15)},
#undef R8
};

KTL_INLINE __m512i bytes_pair(int lo, int hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi8((char)lo)), _mm256_set1_epi8((char)hi), 1);
}

KTL_INLINE void group16_scales(__m256i s16, kdec *o) {
    __m512i z = _mm512_castsi256_si512(s16);
    for (int c = 0; c < 4; c++) o->sc[c] = _mm512_permutexvar_epi16(idx_const(G16_IDX[c]), z);
}

/* Q4_K/Q5_K block head (d, dmin, 12 bytes of 6-bit scales and mins) -> 16 bytes sc0..7 m0..7,
 * in SIMD registers (the same bit moves as ktl_k4_scales) */
KTL_INLINE __m512i k4_scales_x4(__m512i head) { /* four heads, one per 128-bit lane */
    __m512i a = _mm512_shuffle_epi32(head, _MM_SHUFFLE(2, 1, 2, 1)); /* s0-3 s4-7 s0-3 s4-7 */
    __m512i c = _mm512_shuffle_epi32(head, _MM_SHUFFLE(3, 3, 3, 3)); /* s8-11 x4 */
    __m512i lo = _mm512_and_si512(a, _mm512_set1_epi8(0x3f));
    __m512i hi = _mm512_and_si512(_mm512_srlv_epi32(c, _mm512_setr4_epi32(0, 4, 0, 4)), _mm512_set1_epi8(0x0f));
    hi = _mm512_or_si512(hi, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a, 6), _mm512_set1_epi8(3)), 4));
    return _mm512_unpacklo_epi32(lo, hi); /* sc0-3 sc4-7 m0-3 m4-7 */
}

KTL_INLINE __m128i k4_scales_simd(__m128i head) {
    return _mm512_castsi512_si128(k4_scales_x4(_mm512_castsi128_si512(head)));
}

/* vpshufb controls: int16 lanes of sc[c], zero-extended: zmm c holds the 32-groups
 * (0 2) (1 3) (4 6) (5 7), as the activations (KTL_ACT_Q8_KP); and the mins m0..7 each twice
 * (one per 16 codes, in the natural order of the activations' 16-sums) */
static const int8_t K4_SC_CTRL[4][64] = {
#define P2(v) v, -128, v, -128, v, -128, v, -128, v, -128, v, -128, v, -128, v, -128
    {P2(0), P2(0), P2(2), P2(2)}, {P2(1), P2(1), P2(3), P2(3)},
    {P2(4), P2(4), P2(6), P2(6)}, {P2(5), P2(5), P2(7), P2(7)},
#undef P2
};
static const int8_t K4_MIN_CTRL[32] = {8, -128, 8, -128, 9, -128, 9, -128, 10, -128, 10, -128, 11, -128, 11, -128,
                                       12, -128, 12, -128, 13, -128, 13, -128, 14, -128, 14, -128, 15, -128, 15, -128};

/* The 256 nibble codes of a Q4_K/Q5_K super-block: q[2h] the low nibbles of bytes 64h..64h+63
 * (groups 4h, 4h+2), q[2h+1] their high nibbles (groups 4h+1, 4h+3). */
KTL_INLINE void k4_nibbles(const uint8_t *qs, __m512i q[4]) {
    __m512i m4 = _mm512_set1_epi8(15);
    for (int h = 0; h < 2; h++) {
        __m512i v = _mm512_loadu_si512((const void *)(qs + 64 * h));
        q[2 * h] = _mm512_and_si512(v, m4);
        q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    }
}

/* A Q4_K/Q5_K head: d, dmin, the mins per 16 codes (corr); returns the unpacked scales in
 * every 128-bit lane, for the callers' scale shuffles. */
KTL_INLINE __m512i k4_head(const uint8_t *b, __m256i *corr, float *d, float *dmin) {
    __m128i head = _mm_loadu_si128((const __m128i *)b);
    __m512i r = _mm512_broadcast_i32x4(k4_scales_simd(head));
    *corr = _mm256_shuffle_epi8(_mm512_castsi512_si256(r), _mm256_loadu_si256((const __m256i *)K4_MIN_CTRL));
    __m128 dd = _mm_cvtph_ps(head); /* d, dmin */
    *d = _mm_cvtss_f32(dd);
    *dmin = _mm_cvtss_f32(_mm_movehdup_ps(dd));
    return r;
}

KTL_INLINE void kdec_q45(const uint8_t *b, const uint8_t *qs, kdec *o) {
    k4_nibbles(qs, o->q);
    __m512i r = k4_head(b, &o->corr, &o->d, &o->dmin);
    for (int c = 0; c < 4; c++) o->sc[c] = _mm512_shuffle_epi8(r, _mm512_loadu_si512((const void *)K4_SC_CTRL[c]));
}

KTL_INLINE void kdec_q4_k(const uint8_t *b, kdec *o) { kdec_q45(b, b + Q4_K_QS, o); }

KTL_INLINE void kdec_q5_k(const uint8_t *b, kdec *o) {
    kdec_q45(b, b + Q5_K_QS, o);
    __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + Q5_K_QH)));
    __m512i sixteen = _mm512_set1_epi8(16);
    for (int c = 0; c < 4; c++) {
        int g = 4 * (c >> 1) + (c & 1); /* zmm c holds groups g and g + 2 */
        __mmask64 k = _mm512_test_epi8_mask(h, bytes_pair(1 << g, 1 << (g + 2)));
        o->q[c] = _mm512_mask_add_epi8(o->q[c], k, o->q[c], sixteen);
    }
}

/* The 256 six-bit codes of a Q6_K super-block (unsigned, 0..63): low nibbles with their two
 * high bits, in the same group order as k4_nibbles. */
KTL_INLINE void k6_codes(const uint8_t *b, __m512i q[4]) {
    __m512i m4 = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
    __m512i sh_a = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4), sh_b = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    for (int h = 0; h < 2; h++) {
        __m512i l = _mm512_loadu_si512((const void *)(b + Q6_K_QL + 64 * h));
        __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + Q6_K_QH + 32 * h)));
        __m512i lo = _mm512_and_si512(l, m4), hi = _mm512_and_si512(_mm512_srli_epi16(l, 4), m4);
        q[2 * h] = _mm512_or_si512(lo, _mm512_and_si512(_mm512_sllv_epi64(qh, sh_a), m30));
        q[2 * h + 1] = _mm512_or_si512(hi, _mm512_and_si512(_mm512_srlv_epi64(qh, sh_b), m30));
    }
}

KTL_INLINE void kdec_q6_k(const uint8_t *b, kdec *o) {
    k6_codes(b, o->q);
    __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + Q6_K_SC)));
    group16_scales(s16, o);
    o->corr = _mm256_slli_epi16(s16, 5);
    o->d = h2f(b + Q6_K_D);
    o->dmin = 0.0f;
}

KTL_INLINE __m512i two_bit_codes(const uint8_t *qs, int c) {
    __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * (c >> 1))));
    __m512i sh = (c & 1) ? _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4) : _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi64(v, sh), _mm512_set1_epi8(3));
}

KTL_INLINE void kdec_q3_k(const uint8_t *b, kdec *o) {
    __m512i hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + Q3_K_HM)));
    __m512i four = _mm512_set1_epi8(4);
    for (int c = 0; c < 4; c++) {
        __m512i q = two_bit_codes(b + Q3_K_QS, c);
        int bit = 4 * (c >> 1) + 2 * (c & 1);
        __mmask64 k = _mm512_test_epi8_mask(hm, bytes_pair(1 << bit, 1 << (bit + 1)));
        o->q[c] = _mm512_mask_add_epi8(q, k, q, four);
    }
    uint8_t sc[16];
    ktl_k3_scales(b + Q3_K_SC, sc);
    __m256i s16 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)sc)), _mm256_set1_epi16(32));
    group16_scales(s16, o);
    o->corr = _mm256_slli_epi16(s16, 2);
    o->d = h2f(b + Q3_K_D);
    o->dmin = 0.0f;
}

KTL_INLINE void kdec_q2_k(const uint8_t *b, kdec *o) {
    for (int c = 0; c < 4; c++) o->q[c] = two_bit_codes(b + Q2_K_QS, c);
    __m128i s = _mm_loadu_si128((const __m128i *)(b + Q2_K_SC));
    __m128i m4 = _mm_set1_epi8(15);
    group16_scales(_mm256_cvtepu8_epi16(_mm_and_si128(s, m4)), o);
    o->corr = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), m4));
    o->d = h2f(b + Q2_K_D);
    o->dmin = h2f(b + Q2_K_DMIN);
}

/* acc + this block's contribution; the contribution does not depend on acc, so the chain through
 * acc is one add per block */
KTL_INLINE __m512 kdot(const kdec *w, const int8_t *xq, const int16_t *bs, float dx, int has_min, __m512 acc) {
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    s0 = _mm512_dpwssd_epi32(s0, _mm512_maddubs_epi16(w->q[0], _mm512_loadu_si512((const void *)xq)), w->sc[0]);
    s1 = _mm512_dpwssd_epi32(s1, _mm512_maddubs_epi16(w->q[1], _mm512_loadu_si512((const void *)(xq + 64))), w->sc[1]);
    s0 = _mm512_dpwssd_epi32(s0, _mm512_maddubs_epi16(w->q[2], _mm512_loadu_si512((const void *)(xq + 128))), w->sc[2]);
    s1 = _mm512_dpwssd_epi32(s1, _mm512_maddubs_epi16(w->q[3], _mm512_loadu_si512((const void *)(xq + 192))), w->sc[3]);
    __m512i isum = _mm512_add_epi32(s0, s1);
    __m512i corr = _mm512_zextsi256_si512(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)bs), w->corr));
    if (!has_min) {
        isum = _mm512_sub_epi32(isum, corr);
        return _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(w->d * dx)));
    }
    __m512 m = _mm512_mul_ps(_mm512_cvtepi32_ps(corr), _mm512_set1_ps(w->dmin * dx));
    return _mm512_add_ps(acc, _mm512_fmsub_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(w->d * dx), m));
}

#define DEFINE_TILEK(name, BS, HAS_MIN)                                                            \
    KTL_INLINE void kblock_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, \
                                  int rm, int rn, int64_t b, __m512 acc[KRM][KRN]) {               \
        for (int i = 0; i < rm; i++) {                                                             \
            kdec dw;                                                                               \
            PREFETCH_SPAN(w + i * a->row_bytes + b * (BS), BS);                                       \
            kdec_##name(w + i * a->row_bytes + b * (BS), &dw);                                     \
            for (int j = 0; j < rn; j++) {                                                         \
                const float dx = ((const float *)(x[j] + a->lay.d_off))[b];                        \
                const int16_t *bs = (const int16_t *)(x[j] + a->lay.s_off) + 16 * b;               \
                acc[i][j] = kdot(&dw, (const int8_t *)x[j] + KTL_QKK * b, bs, dx, HAS_MIN, acc[i][j]); \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    KTL_INLINE void tile_##name(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *const *x, \
                                int rm, int rn, float *c) {                                        \
        __m512 acc[KRM][KRN];                                                                        \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) acc[i][j] = _mm512_setzero_ps();                          \
        int64_t nb = a->k1 / KTL_QKK, b = a->k0 / KTL_QKK;                                         \
        if (rm * rn <= 2) { /* small tile: two accumulator sets, even and odd blocks */            \
            __m512 acc2[KRM][KRN];                                                                   \
            for (int i = 0; i < rm; i++)                                                           \
                for (int j = 0; j < rn; j++) acc2[i][j] = _mm512_setzero_ps();                     \
            for (; b + 1 < nb; b += 2) {                                                           \
                kblock_##name(a, w, x, rm, rn, b, acc);                                            \
                kblock_##name(a, w, x, rm, rn, b + 1, acc2);                                       \
            }                                                                                      \
            for (int i = 0; i < rm; i++)                                                           \
                for (int j = 0; j < rn; j++) acc[i][j] = _mm512_add_ps(acc[i][j], acc2[i][j]);     \
        }                                                                                          \
        for (; b < nb; b++) kblock_##name(a, w, x, rm, rn, b, acc);                                \
        for (int i = 0; i < rm; i++)                                                               \
            for (int j = 0; j < rn; j++) c[i * KRN + j] = _mm512_reduce_add_ps(acc[i][j]);          \
    }

DEFINE_TILEK(q2_k, 84, 1)
DEFINE_TILEK(q3_k, 110, 0)
DEFINE_TILEK(q4_k, 144, 1)
DEFINE_TILEK(q5_k, 176, 1)
DEFINE_TILEK(q6_k, 210, 0)

/* ---------------------------------------------------------------- K types, one token (GEMV) */

/* With one token the tile's work per block is all weight-side, so the block dot is made
 * cheaper: vpdpbusd sums 4 code x activation products per int32 lane (at most 4 * 63 * 127 =
 * 32004, Q6_K: it fits int16), vpackssdw packs two such zmm (no saturation), and one vpdpwssd
 * per packed pair applies the per-16/32 scales: 4 + 2 + 2 instructions and 2 scale vectors per
 * block instead of 4 vpmaddubsw + 4 vpdpwssd and 4 scale vectors. After the pack, 128-bit lane
 * L of pack(D0, D1) holds lanes 4L..4L+3 of D0 then of D1; its scale vector holds the matching
 * scales, 4 int16 each. Rows are walked one at a time (one sequential stream); every 4 rows
 * are reduced and stored together. */
typedef struct {
    __m512i q[4];  /* 256 unsigned codes, in the order of the activations */
    __m512i sc[2]; /* int16 scales of pack(D0, D1) and pack(D2, D3) */
    __m256i corr;  /* int16 per 16 codes: offset 32 * scale */
    float d;
} kdec1; /* a decoded Q6_K block (row1_q6_k) */

/* One token's block dot of the one-row paths: the 256 codes q (unsigned, in the activations'
 * order) times the block's 8-bit activations, the 4 dot vectors packed pairwise to int16 and
 * multiplied by the int16 scale vectors sc0 (of pack(D0, D1)) and sc1 (of pack(D2, D3)). */
KTL_INLINE __m512i kdot1(const __m512i q[4], const int8_t *xq, __m512i sc0, __m512i sc1) {
    __m512i z = _mm512_setzero_si512(), d[4];
    for (int c = 0; c < 4; c++) d[c] = _mm512_dpbusd_epi32(z, q[c], _mm512_loadu_si512((const void *)(xq + 64 * c)));
    __m512i isum = _mm512_dpwssd_epi32(z, _mm512_packs_epi32(d[0], d[1]), sc0);
    return _mm512_dpwssd_epi32(isum, _mm512_packs_epi32(d[2], d[3]), sc1);
}

/* Q4_K (Q8_KP order): D0 holds groups 0 (lanes 0-7) and 2, D1 groups 1 and 3, D2 4 and 6, D3 5
 * and 7: lanes 0-1 of pack(D0, D1) want sc0 x4 sc1 x4, lanes 2-3 sc2 x4 sc3 x4 (zero-extended
 * bytes of k4_scales_simd) */
static const int8_t K4_SC1_CTRL[2][64] = {
#define Z4(v) v, -128, v, -128, v, -128, v, -128
#define L2(a, b) Z4(a), Z4(b)
    {L2(0, 1), L2(0, 1), L2(2, 3), L2(2, 3)}, {L2(4, 5), L2(4, 5), L2(6, 7), L2(6, 7)},
#undef L2
#undef Z4
};

/* Q4_K heads of a row part, one token: the scales and mins of n <= K4_PART blocks (16 bytes
 * each, k4_scales_simd's order) decoded four blocks per zmm, and d * dx, dmin * dx per block as
 * vectors, so that the block loop (row1_q4_k) does the codes only: about 10 of the 50
 * instructions a block took were the head's 6-bit unpacking and scalar scale products. */
#define K4_PART 16
KTL_INLINE void k4_heads(const uint8_t *w, const float *dx, int n, uint8_t sc[K4_PART][16], float dd[K4_PART][2]) {
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const uint8_t *b = w + 144 * i;
        __m512i h = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)b));
        h = _mm512_inserti32x4(h, _mm_loadu_si128((const __m128i *)(b + 144)), 1);
        h = _mm512_inserti32x4(h, _mm_loadu_si128((const __m128i *)(b + 288)), 2);
        h = _mm512_inserti32x4(h, _mm_loadu_si128((const __m128i *)(b + 432)), 3);
        _mm512_store_si512((void *)sc[i], k4_scales_x4(h));
        __m128i halves = _mm512_castsi512_si128(_mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0,
                                                                                          0, 0, 0, 0, 0, 0), h));
        __m256 dx2 = _mm256_permutexvar_ps(_mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), _mm256_castps128_ps256(_mm_loadu_ps(dx + i)));
        _mm256_store_ps(dd[i], _mm256_mul_ps(_mm256_cvtph_ps(halves), dx2)); /* d0 dmin0 d1 dmin1 ... */
    }
    for (; i < n; i++) {
        __m128i head = _mm_loadu_si128((const __m128i *)(w + 144 * i));
        _mm_store_si128((__m128i *)sc[i], k4_scales_simd(head));
        _mm_storel_pi((__m64 *)dd[i], _mm_mul_ps(_mm_cvtph_ps(head), _mm_set1_ps(dx[i])));
    }
}

KTL_INLINE __m512 row1_q4_k(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *x) {
    const float *dx = (const float *)(x + a->lay.d_off);
    const int16_t *bs = (const int16_t *)(x + a->lay.s_off);
    const __m512i ctrl0 = _mm512_loadu_si512((const void *)K4_SC1_CTRL[0]);
    const __m512i ctrl1 = _mm512_loadu_si512((const void *)K4_SC1_CTRL[1]);
    const __m256i min_ctrl = _mm256_loadu_si256((const __m256i *)K4_MIN_CTRL);
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    int64_t nb = a->k / KTL_QKK;
    for (int64_t b0 = 0; b0 < nb; b0 += K4_PART) {
        int n = nb - b0 < K4_PART ? (int)(nb - b0) : K4_PART;
        _Alignas(64) uint8_t sc[K4_PART][16];
        _Alignas(32) float dd[K4_PART][2];
        k4_heads(w + 144 * b0, dx + b0, n, sc, dd);
        for (int i = 0; i < n; i++) {
            int64_t b = b0 + i;
            const int8_t *xq = (const int8_t *)x + KTL_QKK * b;
            PREFETCH_SPAN(w + 144 * b, 144);
            __m512i q[4];
            k4_nibbles(w + 144 * b + Q4_K_QS, q);
            __m512i r = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *)sc[i]));
            __m512i isum = kdot1(q, xq, _mm512_shuffle_epi8(r, ctrl0), _mm512_shuffle_epi8(r, ctrl1));
            __m256i corr = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(bs + 16 * b)),
                                             _mm256_shuffle_epi8(_mm512_castsi512_si256(r), min_ctrl));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(dd[i][0]), acc);
            accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(corr), _mm256_set1_ps(dd[i][1]), accm);
        }
    }
    return _mm512_sub_ps(acc, _mm512_zextps256_ps512(accm));
}
DEFINE_GEMV_ROWS(q4_k)

/* Q6_K (natural order, zmm c = values 64c..64c+63): lane L of pack(D0, D1) holds 16-groups L
 * and 4 + L, of pack(D2, D3) 8 + L and 12 + L. The int8 scales go to the high byte of each
 * int16 (vpshufb), then an arithmetic shift sign-extends them. */
static const int8_t K6_SC1_CTRL[2][64] = {
#define H4(v) -128, v, -128, v, -128, v, -128, v
#define L2(a, b) H4(a), H4(b)
    {L2(0, 4), L2(1, 5), L2(2, 6), L2(3, 7)}, {L2(8, 12), L2(9, 13), L2(10, 14), L2(11, 15)},
#undef L2
#undef H4
};

KTL_INLINE void kdec1_q6_k(const uint8_t *b, kdec1 *o) {
    k6_codes(b, o->q);
    __m128i s8 = _mm_loadu_si128((const __m128i *)(b + Q6_K_SC));
    __m512i r = _mm512_broadcast_i32x4(s8);
    for (int c = 0; c < 2; c++)
        o->sc[c] = _mm512_srai_epi16(_mm512_shuffle_epi8(r, _mm512_loadu_si512((const void *)K6_SC1_CTRL[c])), 8);
    o->corr = _mm256_slli_epi16(_mm256_cvtepi8_epi16(s8), 5);
    o->d = h2f(b + Q6_K_D);
}

/* Q6_K row, one token: the row's lane sums */
KTL_INLINE __m512 row1_q6_k(const ktl_gemm_args *a, const uint8_t *w, const uint8_t *x) {
    const float *dx = (const float *)(x + a->lay.d_off);
    const int16_t *bs = (const int16_t *)(x + a->lay.s_off);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < a->k / KTL_QKK; b++) {
        kdec1 dw;
        const int8_t *xq = (const int8_t *)x + KTL_QKK * b;
        PREFETCH_SPAN(w + 210 * b, 210);
        kdec1_q6_k(w + 210 * b, &dw);
        __m512i isum = kdot1(dw.q, xq, dw.sc[0], dw.sc[1]);
        __m256i corr = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(bs + 16 * b)), dw.corr);
        isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(corr)); /* the offset 32 */
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(dw.d * dx[b]), acc);
    }
    return acc;
}
DEFINE_GEMV_ROWS(q6_k)

DEFINE_GEMM(f32, RM, RN)
DEFINE_GEMM(f16, RM, RN)
DEFINE_GEMM(bf16, RM, RN)
DEFINE_GEMM_GEMV(q4_0, RM, RN)
DEFINE_GEMM_GEMV(q4_1, RM, RN)
DEFINE_GEMM_GEMV(q5_0, RM, RN)
DEFINE_GEMM_GEMV(q5_1, RM, RN)
DEFINE_GEMM_GEMV(q8_0, RM, RN)
DEFINE_GEMM(q2_k, KRM, KRN)
DEFINE_GEMM(q3_k, KRM, KRN)
DEFINE_GEMM_GEMV(q4_k, KRM, KRN)
DEFINE_GEMM(q5_k, KRM, KRN)
DEFINE_GEMM_GEMV(q6_k, KRM, KRN)
