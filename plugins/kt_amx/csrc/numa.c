/* NUMA placement of packed weights: memory nobody has touched yet (mmap), filled by the pool
 * workers of one node so that first touch puts the pages there, and, on a real multi-node
 * host, an mbind(MPOL_PREFERRED) hint through the raw syscall (no libnuma needed; any
 * failure is ignored: placement is an optimisation, never a requirement). */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kt_job.h"

#define KT_COPY_CHUNK (1 << 20)

void *kt_numa_alloc(int64_t bytes) {
    if (bytes <= 0) return NULL;
#if defined(__linux__)
    void *p = mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
#else
    void *p = NULL;
    return posix_memalign(&p, 4096, (size_t)bytes) == 0 ? p : NULL;
#endif
}

void kt_numa_free(void *p, int64_t bytes) {
    if (!p) return;
#if defined(__linux__)
    munmap(p, (size_t)bytes);
#else
    (void)bytes;
    free(p);
#endif
}

static void prefer_node(void *p, int64_t bytes, int32_t node) {
#if defined(__linux__) && defined(SYS_mbind)
    if (node < 0 || node >= 1024) return;
    unsigned long mask[1024 / (8 * sizeof(unsigned long))];
    memset(mask, 0, sizeof mask);
    mask[node / (8 * sizeof(unsigned long))] = 1ul << (node % (8 * sizeof(unsigned long)));
    const int MPOL_PREFERRED_ = 1;
    (void)syscall(SYS_mbind, p, (unsigned long)bytes, MPOL_PREFERRED_, mask, (unsigned long)1024, 0u);
#else
    (void)p, (void)bytes, (void)node;
#endif
}

typedef struct {
    uint8_t *dst;
    const uint8_t *src;
    int64_t bytes;
} copy_ctx;

static void copy_chunk(void *arg, int64_t item, int worker) {
    (void)worker;
    const copy_ctx *c = arg;
    const int64_t off = item * KT_COPY_CHUNK;
    const int64_t n = c->bytes - off < KT_COPY_CHUNK ? c->bytes - off : KT_COPY_CHUNK;
    memcpy(c->dst + off, c->src + off, (size_t)n);
}

int kt_numa_copy(void *dst, const void *src, int64_t bytes, const int32_t *node_of_worker, int32_t n_workers,
                 int32_t node, int32_t mbind_node) {
    const int pool = kt_pool_size();
    if (pool <= 0) return KT_E_NO_POOL;
    if (!dst || !src || bytes < 0) return -1;
    if (mbind_node >= 0) {
        const int64_t page = 4096;
        const int64_t start = (int64_t)(uintptr_t)dst / page * page;
        prefer_node((void *)(uintptr_t)start, (int64_t)(uintptr_t)dst + bytes - start, mbind_node);
    }
    int32_t *wmap = malloc(sizeof(int32_t) * (size_t)pool);
    if (!wmap) return -1;
    int32_t count = 0;
    for (int w = 0; w < pool; w++) wmap[w] = w < n_workers && node_of_worker[w] == node ? count++ : -1;
    if (count == 0) wmap[node % pool] = count++; /* no worker on that node: any one copies */
    copy_ctx c = {dst, src, bytes};
    const int status = kt_pool_run_for(copy_chunk, &c, (bytes + KT_COPY_CHUNK - 1) / KT_COPY_CHUNK, wmap, count);
    free(wmap);
    return status;
}
