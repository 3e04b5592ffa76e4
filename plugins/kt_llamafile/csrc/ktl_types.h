/* GGUF tensor types handled by kt-llamafile: ids, block geometry, byte offsets inside a block,
 * and the scalar helpers every source shares (unaligned little-endian loads, fp16/bf16 to fp32).
 *
 * Blocks are read through byte offsets and memcpy loads, never through packed structs, so the
 * code is correct for any alignment of the mmapped file (and clean under -fsanitize=alignment).
 *
 * Layouts (bytes; "d" are fp16 scales; QK = 32 for the legacy types, 256 for the K types):
 *   Q4_0  18 : d | qs[16]                 x = d*(q-8),  q = nibble (low: 0..15, high: 16..31)
 *   Q4_1  20 : d | m | qs[16]             x = d*q + m
 *   Q5_0  22 : d | qh[4] | qs[16]         x = d*(q-16), q = nibble | bit i of qh << 4
 *   Q5_1  24 : d | m | qh[4] | qs[16]     x = d*q + m
 *   Q8_0  34 : d | qs[32] (int8)          x = d*q
 *   Q2_K  84 : scales[16] | qs[64] | d | dmin         per 16: x = d*(sc&15)*q - dmin*(sc>>4)
 *   Q3_K 110 : hmask[32] | qs[64] | scales[12] | d    per 16: x = d*(sc6-32)*(q2 - 4*!hbit)
 *   Q4_K 144 : d | dmin | scales[12] | qs[128]        per 32: x = d*sc*q - dmin*m (6-bit sc, m)
 *   Q5_K 176 : d | dmin | scales[12] | qh[32] | qs[128]
 *   Q6_K 210 : ql[128] | qh[64] | scales[16] (int8) | d   per 16: x = d*sc*(q6-32)
 */
#ifndef KTL_TYPES_H
#define KTL_TYPES_H

#include <stdint.h>
#include <string.h>

/* ggml type ids (GGMLQuantizationType) */
enum {
    KTL_F32 = 0, KTL_F16 = 1, KTL_Q4_0 = 2, KTL_Q4_1 = 3, KTL_Q5_0 = 6, KTL_Q5_1 = 7,
    KTL_Q8_0 = 8, KTL_Q2_K = 10, KTL_Q3_K = 11, KTL_Q4_K = 12, KTL_Q5_K = 13, KTL_Q6_K = 14,
    KTL_BF16 = 30,
};

#define KTL_QK 32
#define KTL_QKK 256

/* Byte offsets inside blocks. */
#define Q4_0_QS 2
#define Q4_1_M 2
#define Q4_1_QS 4
#define Q5_0_QH 2
#define Q5_0_QS 6
#define Q5_1_M 2
#define Q5_1_QH 4
#define Q5_1_QS 8
#define Q8_0_QS 2
#define Q2_K_SC 0
#define Q2_K_QS 16
#define Q2_K_D 80
#define Q2_K_DMIN 82
#define Q3_K_HM 0
#define Q3_K_QS 32
#define Q3_K_SC 96
#define Q3_K_D 108
#define Q4_K_DMIN 2
#define Q4_K_SC 4
#define Q4_K_QS 16
#define Q5_K_DMIN 2
#define Q5_K_SC 4
#define Q5_K_QH 16
#define Q5_K_QS 48
#define Q6_K_QL 0
#define Q6_K_QH 128
#define Q6_K_SC 192
#define Q6_K_D 208

/* Activation kinds a weight type is multiplied with. KTL_ACT_Q8_KP is KTL_ACT_Q8_K with the
 * 32-value groups of each 256 block stored in the order 0 2 1 3 4 6 5 7 (the order in which
 * the AVX-512 kernels unpack Q4_K/Q5_K nibbles); each kernel table says which kind it uses. */
enum { KTL_ACT_F32 = 0, KTL_ACT_Q8_0 = 1, KTL_ACT_Q8_K = 2, KTL_ACT_Q8_KP = 3 };

static inline uint16_t ktl_ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ktl_ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ktl_ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline float ktl_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE half to float, exact for every input (subnormals, infinities, NaN payloads kept). */
static inline float ktl_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    return ktl_bits_f32(bits);
}

static inline float ktl_bf2f(uint16_t b) { return ktl_bits_f32((uint32_t)b << 16); }

static inline float ktl_ldh(const uint8_t *p) { return ktl_h2f(ktl_ld16(p)); }

/* Elements per block and bytes per block of a type; 0 for types we do not handle. */
static inline int ktl_block_elems(int qtype) {
    switch (qtype) {
    case KTL_F32: case KTL_F16: case KTL_BF16: return 1;
    case KTL_Q4_0: case KTL_Q4_1: case KTL_Q5_0: case KTL_Q5_1: case KTL_Q8_0: return KTL_QK;
    case KTL_Q2_K: case KTL_Q3_K: case KTL_Q4_K: case KTL_Q5_K: case KTL_Q6_K: return KTL_QKK;
    default: return 0;
    }
}

static inline int ktl_block_bytes(int qtype) {
    switch (qtype) {
    case KTL_F32: return 4;
    case KTL_F16: case KTL_BF16: return 2;
    case KTL_Q4_0: return 18;
    case KTL_Q4_1: return 20;
    case KTL_Q5_0: return 22;
    case KTL_Q5_1: return 24;
    case KTL_Q8_0: return 34;
    case KTL_Q2_K: return 84;
    case KTL_Q3_K: return 110;
    case KTL_Q4_K: return 144;
    case KTL_Q5_K: return 176;
    case KTL_Q6_K: return 210;
    default: return 0;
    }
}

static inline int ktl_act_kind(int qtype) {
    int b = ktl_block_elems(qtype);
    return b == 1 ? KTL_ACT_F32 : b == KTL_QK ? KTL_ACT_Q8_0 : KTL_ACT_Q8_K;
}

/* Q4_K/Q5_K: the eight 6-bit scales and mins packed in 12 bytes, as 8 bytes each. */
static inline void ktl_k4_scales(const uint8_t *s, uint64_t *sc, uint64_t *mn) {
    uint32_t a0 = ktl_ld32(s), a1 = ktl_ld32(s + 4), a2 = ktl_ld32(s + 8);
    uint32_t sc_lo = a0 & 0x3f3f3f3fu;
    uint32_t mn_lo = a1 & 0x3f3f3f3fu;
    uint32_t sc_hi = (a2 & 0x0f0f0f0fu) | (((a0 >> 6) & 0x03030303u) << 4);
    uint32_t mn_hi = ((a2 >> 4) & 0x0f0f0f0fu) | (((a1 >> 6) & 0x03030303u) << 4);
    *sc = (uint64_t)sc_lo | ((uint64_t)sc_hi << 32);
    *mn = (uint64_t)mn_lo | ((uint64_t)mn_hi << 32);
}

/* Q3_K: the sixteen 6-bit scales packed in 12 bytes, unsigned (subtract 32 for the value). */
static inline void ktl_k3_scales(const uint8_t *s, uint8_t out[16]) {
    uint32_t a0 = ktl_ld32(s), a1 = ktl_ld32(s + 4), a2 = ktl_ld32(s + 8);
    uint32_t w[4];
    w[0] = (a0 & 0x0f0f0f0fu) | ((a2 & 0x03030303u) << 4);
    w[1] = (a1 & 0x0f0f0f0fu) | (((a2 >> 2) & 0x03030303u) << 4);
    w[2] = ((a0 >> 4) & 0x0f0f0f0fu) | (((a2 >> 4) & 0x03030303u) << 4);
    w[3] = ((a1 >> 4) & 0x0f0f0f0fu) | (((a2 >> 6) & 0x03030303u) << 4);
    memcpy(out, w, 16);
}

#endif
