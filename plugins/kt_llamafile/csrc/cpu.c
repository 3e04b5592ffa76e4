/* Run-time ISA selection: CPUID feature bits and XCR0 (the OS saves the AVX / AVX-512 register
 * state), never by trying an instruction. KT_LLAMAFILE_ISA=scalar|avx2|avx512 asks for a
 * lower level (a higher one than the CPU has is ignored). Compiled with baseline flags. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "ktl_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t read_xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static int detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return 0;
    uint64_t xcr0 = read_xcr0();
    if ((xcr0 & 0x6) != 0x6) return 0; /* XMM and YMM state */
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1;
    int avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    int vnni = (c >> 11) & 1;
    int level = 0;
    if (avx2 && fma && f16c) level = 1;
    if (level == 1 && avx512f && avx512bw && avx512vl && vnni && (xcr0 & 0xe0) == 0xe0) level = 2;
    return level;
}
#else
static int detect(void) { return 0; }
#endif

static const ktl_kernels *const TABLES[3] = {&ktl_kernels_scalar, &ktl_kernels_avx2, &ktl_kernels_avx512};

static atomic_int g_available = -1;
static atomic_int g_selected = -1;

static int level_from_env(void) {
    const char *s = getenv("KT_LLAMAFILE_ISA");
    if (!s || !*s) return 2;
    if (!strcmp(s, "scalar")) return 0;
    if (!strcmp(s, "avx2")) return 1;
    return 2;
}

int ktl_init(void) {
    int avail = detect();
    atomic_store(&g_available, avail);
    int want = level_from_env();
    atomic_store(&g_selected, want < avail ? want : avail);
    return atomic_load(&g_selected);
}

int ktl_isa_available(void) {
    if (atomic_load(&g_available) < 0) ktl_init();
    return atomic_load(&g_available);
}

int ktl_isa_selected(void) {
    if (atomic_load(&g_selected) < 0) ktl_init();
    return atomic_load(&g_selected);
}

int ktl_isa_select(int level) {
    if (level < 0 || level > ktl_isa_available()) return KTL_ERR_ARG;
    atomic_store(&g_selected, level);
    return level;
}

const ktl_kernels *ktl_selected(void) { return TABLES[ktl_isa_selected()]; }
