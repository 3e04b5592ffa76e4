/* CPU feature detection and the ISA dispatch table.
 *
 * Only the cpuid instruction and xgetbv (after CPUID says OSXSAVE) are executed here, so this
 * file runs on any x86-64 CPU; the kernels of a level are reached only once both the CPU
 * (CPUID) and the OS (XCR0, and for AMX the Linux permission request) allow it.
 * KT_AMX_ISA=avx2|avx512|amx selects a lower level; a higher one than available falls back
 * to the best available with a note (kt_isa_note) that the Python wrapper logs as a warning.
 */
#include <cpuid.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kt_internal.h"

#ifndef KT_NO_AMX_VARIANT
#define KT_HAVE_AMX_VARIANT 1
#define KT_AMX_VARIANT (&kt_ops_amx)
#define KT_AMX_EMULATED kt_amx_emulated_build
#else
#define KT_HAVE_AMX_VARIANT 0
#define KT_AMX_VARIANT NULL
#define KT_AMX_EMULATED 0
#endif

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_available = KT_ISA_NONE;
static int g_selected = KT_ISA_NONE;
static char g_note[256];

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) { __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]); }

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

#define BIT(reg, n) (((reg) >> (n)) & 1u)

/* Linux >= 5.16 keeps AMX tile data disabled per process until asked for. */
static int request_amx_permission(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    const long ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
    unsigned long mask = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mask) != 0) return 0;
    return (mask >> XFEATURE_XTILEDATA) & 1u;
#else
    return 0;
#endif
}

static int detect(void) {
    uint32_t r1[4], r7[4], r71[4] = {0, 0, 0, 0};
    if (__get_cpuid_max(0, NULL) < 7) return KT_ISA_NONE;
    cpuid(1, 0, r1);
    const uint32_t ecx1 = r1[2];
    if (!BIT(ecx1, 27)) return KT_ISA_NONE; /* OSXSAVE: without it xgetbv itself would fault */
    const uint64_t xcr0 = xgetbv0();
    cpuid(7, 0, r7);
    if (r7[0] >= 1) cpuid(7, 1, r71);
    const uint32_t ebx7 = r7[1], ecx7 = r7[2], edx7 = r7[3], eax71 = r71[0];

    int level = KT_ISA_NONE;
    const int avx_os = (xcr0 & 0x6) == 0x6;                  /* SSE + AVX state */
    if (avx_os && BIT(ecx1, 28) && BIT(ecx1, 12) && BIT(ecx1, 29) && BIT(ebx7, 5)) level = KT_ISA_AVX2;
    const int avx512_os = (xcr0 & 0xE6) == 0xE6;             /* + opmask, ZMM_Hi256, Hi16_ZMM */
    const int avx512 = BIT(ebx7, 16) && BIT(ebx7, 30) && BIT(ebx7, 31) /* F, BW, VL */
                       && BIT(ecx7, 11) && BIT(eax71, 5);             /* VNNI, BF16 */
    if (level == KT_ISA_AVX2 && avx512_os && avx512) level = KT_ISA_AVX512;
    if (level == KT_ISA_AVX512 && KT_HAVE_AMX_VARIANT) {
        if (KT_AMX_EMULATED) {
            level = KT_ISA_AMX;
        } else {
            const int amx = BIT(edx7, 24) && BIT(edx7, 25) && BIT(edx7, 22); /* TILE, INT8, BF16 */
            const int amx_os = ((xcr0 >> 17) & 3u) == 3u;                     /* XTILECFG, XTILEDATA */
            if (amx && amx_os && request_amx_permission()) level = KT_ISA_AMX;
        }
    }
    return level;
}

const char *kt_isa_name(int level) {
    switch (level) {
    case KT_ISA_AVX2: return "avx2";
    case KT_ISA_AVX512: return "avx512";
    case KT_ISA_AMX: return "amx";
    default: return "none";
    }
}

static int parse_level(const char *s) {
    for (int l = KT_ISA_AVX2; l <= KT_ISA_AMX; l++)
        if (strcmp(s, kt_isa_name(l)) == 0) return l;
    return -1;
}

static void init_once(void) {
    g_available = detect();
    g_selected = g_available;
    g_note[0] = 0;
    const char *req = getenv("KT_AMX_ISA");
    if (!req || !*req || strcmp(req, "auto") == 0) return;
    const int want = parse_level(req);
    if (want < 0) {
        snprintf(g_note, sizeof g_note, "KT_AMX_ISA=%s is not one of avx2, avx512, amx; using %s", req,
                 kt_isa_name(g_available));
    } else if (want > g_available) {
        snprintf(g_note, sizeof g_note, "KT_AMX_ISA=%s is above what this CPU/OS/build supports; using %s", req,
                 kt_isa_name(g_available));
    } else {
        g_selected = want;
    }
}

int kt_init(void) {
    pthread_once(&g_once, init_once);
    return g_selected;
}

int kt_isa_available(void) {
    kt_init();
    return g_available;
}

int kt_isa_selected(void) {
    kt_init();
    return g_selected;
}

int kt_isa_select(int level) {
    kt_init();
    if (level < KT_ISA_AVX2 || level > g_available) return -1;
    g_selected = level;
    return g_selected;
}

const char *kt_isa_note(void) {
    kt_init();
    return g_note;
}

int kt_amx_emulated(void) { return KT_HAVE_AMX_VARIANT && KT_AMX_EMULATED; }

const kt_isa_ops *kt_isa_ops_selected(void) {
    switch (kt_isa_selected()) {
    case KT_ISA_AVX2: return &kt_ops_avx2;
    case KT_ISA_AVX512: return &kt_ops_avx512;
    case KT_ISA_AMX: return KT_AMX_VARIANT;
    default: return NULL;
    }
}
