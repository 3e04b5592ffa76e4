/* Reference dequantisation of every supported GGUF type, bit-exact with gguf.quants.
 *
 * Each value is computed with the same float32 operations, in the same order, as gguf-py's numpy
 * code (e.g. Q4_1 is (d*q) + m, Q4_K is (d*sc)*q - (dmin*m)); this file is compiled with
 * -ffp-contract=off so that no multiply-add is fused. Scalar C on purpose: it is the oracle the
 * SIMD matmul kernels are tested against, not a fast path.
 */
#include "ktl_api.h"
#include "ktl_types.h"

static void deq_q4_0(const uint8_t *b, float *y) {
    float d = ktl_ldh(b);
    for (int l = 0; l < 16; l++) {
        y[l] = d * (float)((b[Q4_0_QS + l] & 15) - 8);
        y[l + 16] = d * (float)((b[Q4_0_QS + l] >> 4) - 8);
    }
}

static void deq_q4_1(const uint8_t *b, float *y) {
    float d = ktl_ldh(b), m = ktl_ldh(b + Q4_1_M);
    for (int l = 0; l < 16; l++) {
        y[l] = d * (float)(b[Q4_1_QS + l] & 15) + m;
        y[l + 16] = d * (float)(b[Q4_1_QS + l] >> 4) + m;
    }
}

static void deq_q5_0(const uint8_t *b, float *y) {
    float d = ktl_ldh(b);
    uint32_t qh = ktl_ld32(b + Q5_0_QH);
    for (int l = 0; l < 16; l++) {
        int lo = (b[Q5_0_QS + l] & 15) | (int)(((qh >> l) & 1) << 4);
        int hi = (b[Q5_0_QS + l] >> 4) | (int)(((qh >> (l + 16)) & 1) << 4);
        y[l] = d * (float)(lo - 16);
        y[l + 16] = d * (float)(hi - 16);
    }
}

static void deq_q5_1(const uint8_t *b, float *y) {
    float d = ktl_ldh(b), m = ktl_ldh(b + Q5_1_M);
    uint32_t qh = ktl_ld32(b + Q5_1_QH);
    for (int l = 0; l < 16; l++) {
        int lo = (b[Q5_1_QS + l] & 15) | (int)(((qh >> l) & 1) << 4);
        int hi = (b[Q5_1_QS + l] >> 4) | (int)(((qh >> (l + 16)) & 1) << 4);
        y[l] = d * (float)lo + m;
        y[l + 16] = d * (float)hi + m;
    }
}

static void deq_q8_0(const uint8_t *b, float *y) {
    float d = ktl_ldh(b);
    for (int l = 0; l < 32; l++) y[l] = (float)(int8_t)b[Q8_0_QS + l] * d;
}

static void deq_q2_k(const uint8_t *b, float *y) {
    float d = ktl_ldh(b + Q2_K_D), dmin = ktl_ldh(b + Q2_K_DMIN);
    for (int i = 0; i < 256; i++) {
        int h = i >> 7, k = (i >> 5) & 3, l = i & 31, g = i >> 4;
        int q = (b[Q2_K_QS + 32 * h + l] >> (2 * k)) & 3;
        uint8_t sc = b[Q2_K_SC + g];
        float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
        y[i] = dl * (float)q - ml;
    }
}

static void deq_q3_k(const uint8_t *b, float *y) {
    float d = ktl_ldh(b + Q3_K_D);
    uint8_t sc[16];
    ktl_k3_scales(b + Q3_K_SC, sc);
    for (int i = 0; i < 256; i++) {
        int h = i >> 7, k = (i >> 5) & 3, l = i & 31, g = i >> 4;
        int q = (b[Q3_K_QS + 32 * h + l] >> (2 * k)) & 3;
        int hbit = (b[Q3_K_HM + l] >> (4 * h + k)) & 1;
        float dl = d * (float)((int)sc[g] - 32);
        y[i] = dl * (float)(q - (hbit ? 0 : 4));
    }
}

static void deq_q45_k(const uint8_t *b, float *y, int five) {
    float d = ktl_ldh(b), dmin = ktl_ldh(b + Q4_K_DMIN);
    uint64_t sc8, mn8;
    ktl_k4_scales(b + Q4_K_SC, &sc8, &mn8);
    const uint8_t *qs = b + (five ? Q5_K_QS : Q4_K_QS);
    for (int i = 0; i < 256; i++) {
        int s = i >> 5, l = i & 31;
        int q = (qs[32 * (s >> 1) + l] >> (4 * (s & 1))) & 15;
        if (five) q |= ((b[Q5_K_QH + l] >> s) & 1) << 4;
        float dl = d * (float)((sc8 >> (8 * s)) & 0xff);
        float ml = dmin * (float)((mn8 >> (8 * s)) & 0xff);
        y[i] = dl * (float)q - ml;
    }
}

static void deq_q6_k(const uint8_t *b, float *y) {
    float d = ktl_ldh(b + Q6_K_D);
    for (int i = 0; i < 256; i++) {
        int h = i >> 7, r = i & 127, k = r >> 5, l = r & 31;
        int lo = (b[Q6_K_QL + 64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15;
        int hi = (b[Q6_K_QH + 32 * h + l] >> (2 * k)) & 3;
        float dl = d * (float)(int8_t)b[Q6_K_SC + (i >> 4)];
        y[i] = dl * (float)((lo | (hi << 4)) - 32);
    }
}

int ktl_dequantize(int qtype, const uint8_t *src, int64_t n, float *dst) {
    int be = ktl_block_elems(qtype), bb = ktl_block_bytes(qtype);
    if (be == 0) return KTL_ERR_TYPE;
    if (n < 0 || n % be) return KTL_ERR_SHAPE;
    int64_t nb = n / be;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = src + i * bb;
        float *y = dst + i * be;
        switch (qtype) {
        case KTL_F32: memcpy(y, b, 4); break;
        case KTL_F16: *y = ktl_ldh(b); break;
        case KTL_BF16: *y = ktl_bf2f(ktl_ld16(b)); break;
        case KTL_Q4_0: deq_q4_0(b, y); break;
        case KTL_Q4_1: deq_q4_1(b, y); break;
        case KTL_Q5_0: deq_q5_0(b, y); break;
        case KTL_Q5_1: deq_q5_1(b, y); break;
        case KTL_Q8_0: deq_q8_0(b, y); break;
        case KTL_Q2_K: deq_q2_k(b, y); break;
        case KTL_Q3_K: deq_q3_k(b, y); break;
        case KTL_Q4_K: deq_q45_k(b, y, 0); break;
        case KTL_Q5_K: deq_q45_k(b, y, 1); break;
        case KTL_Q6_K: deq_q6_k(b, y); break;
        }
    }
    return 0;
}
