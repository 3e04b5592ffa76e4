/* Portable kernels (KTL_ISA == 0): one weight row times one token row, integer dot products on
 * the quantised activations exactly as the SIMD kernels do them (unsigned weight codes, the
 * code offset folded in through the activation block sums), one tile = 1 x 1. Included by
 * kernels.c only. */

/* Activation block -> int8 codes, scale and the sum of every 16 codes (see kernels.c). */
KTL_INLINE void quant_block(const float *x, int n, int8_t *q, float *d_out, int32_t *sum16) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int g = 0; g < n / 16; g++) {
        int32_t sum = 0;
        for (int i = 16 * g; i < 16 * g + 16; i++) {
            float v = x[i] * id;
            v = v > 127.0f ? 127.0f : v;
            v = v < -127.0f ? -127.0f : v;
            v = v == v ? v : 0.0f;
            q[i] = (int8_t)lrintf(v);
            sum += q[i];
        }
        sum16[g] = sum;
    }
    *d_out = amax / 127.0f;
}

KTL_INLINE uint64_t read_sum_isa(const uint8_t *p, int64_t n, int64_t *done) {
    uint64_t acc[8] = {0};
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (int l = 0; l < 8; l++) acc[l] += ktl_ld64(p + i + 8 * l);
    *done = i;
    uint64_t total = 0;
    for (int l = 0; l < 8; l++) total += acc[l];
    return total;
}

#define DEFINE_GEMM_1(name)                                                                        \
    static void gemm_##name(const ktl_gemm_args *args, int64_t r0, int64_t r1) {                   \
        ktl_gemm_args whole = *args;                                                               \
        const ktl_gemm_args *a = &whole;                                                           \
        whole.k0 = 0;                                                                              \
        whole.k1 = args->k;                                                                        \
        for (int64_t r = r0; r < r1; r++)                                                          \
            for (int64_t j = 0; j < a->ntok; j++) {                                                \
                float c = dot_##name(a->w + r * a->row_bytes, act_row(a, j), a);                   \
                store_tile(a, r, j, 1, 1, &c, 1);                                                  \
            }                                                                                      \
    }

/* ---------------------------------------------------------------- float weights */

static float dot_f32(const uint8_t *w, const uint8_t *x, const ktl_gemm_args *a) {
    float s = 0.0f;
    for (int64_t i = a->k0; i < a->k1; i++) s += ktl_bits_f32(ktl_ld32(w + 4 * i)) * ktl_bits_f32(ktl_ld32(x + 4 * i));
    return s;
}

static float dot_f16(const uint8_t *w, const uint8_t *x, const ktl_gemm_args *a) {
    float s = 0.0f;
    for (int64_t i = a->k0; i < a->k1; i++) s += ktl_ldh(w + 2 * i) * ktl_bits_f32(ktl_ld32(x + 4 * i));
    return s;
}

static float dot_bf16(const uint8_t *w, const uint8_t *x, const ktl_gemm_args *a) {
    float s = 0.0f;
    for (int64_t i = a->k0; i < a->k1; i++) s += ktl_bf2f(ktl_ld16(w + 2 * i)) * ktl_bits_f32(ktl_ld32(x + 4 * i));
    return s;
}

/* ---------------------------------------------------------------- 32-element blocks */

/* value = d*(u - off) or d*u + m for unsigned codes u; returns the block's contribution. */
KTL_INLINE float block32(const int8_t *xq, float dx, int32_t sx, const uint8_t u[32], float d, int off,
                         int has_min, float m) {
    int32_t isum = 0;
    for (int l = 0; l < 32; l++) isum += (int32_t)u[l] * xq[l];
    isum -= off * sx;
    float v = d * dx * (float)isum;
    if (has_min) v += m * dx * (float)sx;
    return v;
}

#define DEFINE_DOT32(name, BYTES, UNPACK, OFF, HAS_MIN, MIN_AT)                                    \
    static float dot_##name(const uint8_t *w, const uint8_t *x, const ktl_gemm_args *a) {          \
        const int8_t *xq = (const int8_t *)x;                                                      \
        const float *dx = (const float *)(x + a->lay.d_off);                                       \
        const int32_t *sx = (const int32_t *)(x + a->lay.s_off);                                   \
        float s = 0.0f;                                                                            \
        for (int64_t b = a->k0 / KTL_QK; b < a->k1 / KTL_QK; b++) {                                              \
            const uint8_t *blk = w + b * (BYTES);                                                  \
            uint8_t u[32];                                                                         \
            UNPACK(blk, u);                                                                        \
            float m = HAS_MIN ? ktl_ldh(blk + (MIN_AT)) : 0.0f;                                     \
            s += block32(xq + b * KTL_QK, dx[b], sx[b], u, ktl_ldh(blk), OFF, HAS_MIN, m);         \
        }                                                                                          \
        return s;                                                                                  \
    }

KTL_INLINE void unpack_nib(const uint8_t *qs, uint8_t u[32]) {
    for (int l = 0; l < 16; l++) {
        u[l] = qs[l] & 15;
        u[l + 16] = qs[l] >> 4;
    }
}

KTL_INLINE void unpack_nib_h(const uint8_t *qs, uint32_t qh, uint8_t u[32]) {
    unpack_nib(qs, u);
    for (int l = 0; l < 32; l++) u[l] |= ((qh >> l) & 1) << 4;
}

#define UNPACK_Q4_0(b, u) unpack_nib((b) + Q4_0_QS, u)
#define UNPACK_Q4_1(b, u) unpack_nib((b) + Q4_1_QS, u)
#define UNPACK_Q5_0(b, u) unpack_nib_h((b) + Q5_0_QS, ktl_ld32((b) + Q5_0_QH), u)
#define UNPACK_Q5_1(b, u) unpack_nib_h((b) + Q5_1_QS, ktl_ld32((b) + Q5_1_QH), u)
#define UNPACK_Q8_0(b, u) for (int l = 0; l < 32; l++) u[l] = (uint8_t)((b)[Q8_0_QS + l] ^ 0x80)

DEFINE_DOT32(q4_0, 18, UNPACK_Q4_0, 8, 0, 0)
DEFINE_DOT32(q4_1, 20, UNPACK_Q4_1, 0, 1, Q4_1_M)
DEFINE_DOT32(q5_0, 22, UNPACK_Q5_0, 16, 0, 0)
DEFINE_DOT32(q5_1, 24, UNPACK_Q5_1, 0, 1, Q5_1_M)
DEFINE_DOT32(q8_0, 34, UNPACK_Q8_0, 128, 0, 0)

/* ---------------------------------------------------------------- K types (256-element blocks) */

/* Decoded K block: unsigned codes u, integer scale per 16 values, the integer correction
 * sum_g corr[g]*bsum[g] subtracted (offset types: corr = off*scale) or scaled by dmin (min types). */
typedef struct {
    uint8_t u[256];
    int16_t sc[16];
    int16_t corr[16];
    float d, dmin;
    int has_min;
} kdec_s;

KTL_INLINE float kdot_s(const kdec_s *w, const int8_t *xq, const int16_t *bs, float dx) {
    int32_t isum = 0;
    for (int g = 0; g < 16; g++) {
        int32_t gs = 0;
        for (int l = 0; l < 16; l++) gs += (int32_t)w->u[16 * g + l] * xq[16 * g + l];
        isum += gs * w->sc[g];
    }
    int32_t corr = 0;
    for (int g = 0; g < 16; g++) corr += (int32_t)w->corr[g] * bs[g];
    if (w->has_min) return w->d * dx * (float)isum - w->dmin * dx * (float)corr;
    return w->d * dx * (float)(isum - corr);
}

static void kdec_q2_k(const uint8_t *b, kdec_s *o) {
    for (int i = 0; i < 256; i++) o->u[i] = (b[Q2_K_QS + 32 * (i >> 7) + (i & 31)] >> (2 * ((i >> 5) & 3))) & 3;
    for (int g = 0; g < 16; g++) {
        o->sc[g] = b[Q2_K_SC + g] & 15;
        o->corr[g] = b[Q2_K_SC + g] >> 4;
    }
    o->d = ktl_ldh(b + Q2_K_D);
    o->dmin = ktl_ldh(b + Q2_K_DMIN);
    o->has_min = 1;
}

static void kdec_q3_k(const uint8_t *b, kdec_s *o) {
    for (int i = 0; i < 256; i++) {
        int h = i >> 7, k = (i >> 5) & 3, l = i & 31;
        int q = (b[Q3_K_QS + 32 * h + l] >> (2 * k)) & 3;
        o->u[i] = (uint8_t)(q + 4 * ((b[Q3_K_HM + l] >> (4 * h + k)) & 1));
    }
    uint8_t sc[16];
    ktl_k3_scales(b + Q3_K_SC, sc);
    for (int g = 0; g < 16; g++) {
        o->sc[g] = (int16_t)(sc[g] - 32);
        o->corr[g] = (int16_t)(4 * o->sc[g]);
    }
    o->d = ktl_ldh(b + Q3_K_D);
    o->dmin = 0.0f;
    o->has_min = 0;
}

static void kdec_q45_k(const uint8_t *b, kdec_s *o, int five) {
    const uint8_t *qs = b + (five ? Q5_K_QS : Q4_K_QS);
    for (int i = 0; i < 256; i++) {
        int s = i >> 5, l = i & 31;
        int q = (qs[32 * (s >> 1) + l] >> (4 * (s & 1))) & 15;
        if (five) q |= ((b[Q5_K_QH + l] >> s) & 1) << 4;
        o->u[i] = (uint8_t)q;
    }
    uint64_t sc8, mn8;
    ktl_k4_scales(b + Q4_K_SC, &sc8, &mn8);
    for (int g = 0; g < 16; g++) {
        o->sc[g] = (int16_t)((sc8 >> (8 * (g >> 1))) & 0xff);
        o->corr[g] = (int16_t)((mn8 >> (8 * (g >> 1))) & 0xff);
    }
    o->d = ktl_ldh(b);
    o->dmin = ktl_ldh(b + Q4_K_DMIN);
    o->has_min = 1;
}

static void kdec_q4_k(const uint8_t *b, kdec_s *o) { kdec_q45_k(b, o, 0); }
static void kdec_q5_k(const uint8_t *b, kdec_s *o) { kdec_q45_k(b, o, 1); }

static void kdec_q6_k(const uint8_t *b, kdec_s *o) {
    for (int i = 0; i < 256; i++) {
        int h = i >> 7, r = i & 127, k = r >> 5, l = r & 31;
        int lo = (b[Q6_K_QL + 64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15;
        int hi = (b[Q6_K_QH + 32 * h + l] >> (2 * k)) & 3;
        o->u[i] = (uint8_t)(lo | (hi << 4));
    }
    for (int g = 0; g < 16; g++) {
        o->sc[g] = (int8_t)b[Q6_K_SC + g];
        o->corr[g] = (int16_t)(32 * o->sc[g]);
    }
    o->d = ktl_ldh(b + Q6_K_D);
    o->dmin = 0.0f;
    o->has_min = 0;
}

#define DEFINE_DOTK(name, BYTES)                                                                   \
    static float dot_##name(const uint8_t *w, const uint8_t *x, const ktl_gemm_args *a) {          \
        const int8_t *xq = (const int8_t *)x;                                                      \
        const float *dx = (const float *)(x + a->lay.d_off);                                       \
        const int16_t *bs = (const int16_t *)(x + a->lay.s_off);                                   \
        float s = 0.0f;                                                                            \
        kdec_s dec;                                                                                \
        for (int64_t b = a->k0 / KTL_QKK; b < a->k1 / KTL_QKK; b++) {                                             \
            kdec_##name(w + b * (BYTES), &dec);                                                    \
            s += kdot_s(&dec, xq + b * KTL_QKK, bs + b * 16, dx[b]);                               \
        }                                                                                          \
        return s;                                                                                  \
    }

DEFINE_DOTK(q2_k, 84)
DEFINE_DOTK(q3_k, 110)
DEFINE_DOTK(q4_k, 144)
DEFINE_DOTK(q5_k, 176)
DEFINE_DOTK(q6_k, 210)

DEFINE_GEMM_1(f32)
DEFINE_GEMM_1(f16)
DEFINE_GEMM_1(bf16)
DEFINE_GEMM_1(q4_0)
DEFINE_GEMM_1(q4_1)
DEFINE_GEMM_1(q5_0)
DEFINE_GEMM_1(q5_1)
DEFINE_GEMM_1(q8_0)
DEFINE_GEMM_1(q2_k)
DEFINE_GEMM_1(q3_k)
DEFINE_GEMM_1(q4_k)
DEFINE_GEMM_1(q5_k)
DEFINE_GEMM_1(q6_k)
