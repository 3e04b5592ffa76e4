/* Public C API of kt_llamafile._kernels (cffi reads the declarations below, '#' lines skipped).
 *
 * Types are ggml type ids (F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q2_K 10,
 * Q3_K 11, Q4_K 12, Q5_K 13, Q6_K 14, BF16 30). Weights are the raw GGUF rows: row r of an
 * [n, k] tensor starts at w + r * row_bytes(type, k). Activations and outputs are fp32.
 * Functions return 0 or a negative KTL_ERR_* code; they never abort.
 */
#ifndef KTL_API_H
#define KTL_API_H
#include <stddef.h>
#include <stdint.h>

#define KTL_ERR_TYPE -1
#define KTL_ERR_SHAPE -2
#define KTL_ERR_NOMEM -3
#define KTL_ERR_IDS -4
#define KTL_ERR_ARG -5
#define KTL_ERR_NOT_SUBMITTED -6

typedef struct ktl_pool ktl_pool;

/* CPU detection and kernel selection. ISA levels: 0 scalar, 1 avx2 (+fma, f16c),
 * 2 avx512 (F, BW, VL, VNNI). ktl_init() detects (CPUID + XCR0) and applies the environment
 * variable KT_LLAMAFILE_ISA=scalar|avx2|avx512 (never above what the CPU has). */
int ktl_init(void);
int ktl_isa_available(void);
int ktl_isa_selected(void);
int ktl_isa_select(int level);

/* Bytes per row of k elements of a type (0 for an unknown type or k not a block multiple). */
int64_t ktl_row_bytes(int qtype, int64_t k);

/* Reference dequantisation of n elements (bit-exact with gguf.quants). */
int ktl_dequantize(int qtype, const uint8_t *src, int64_t n, float *dst);

/* Worker pool: `threads` workers in all, the calling thread being one of them; pin != 0 pins
 * the extra workers to the CPUs of the process affinity mask, one each. */
ktl_pool *ktl_pool_create(int threads, int pin);
void ktl_pool_destroy(ktl_pool *pool);
int ktl_pool_threads(const ktl_pool *pool);
/* Microseconds idle workers of every own pool spin before they sleep (default 50). */
void ktl_set_spin_us(int us);
int ktl_spin_us(void);

/* A parallel-for of another library (kt-amx's kt_pool_parallel_for, DESIGN section 6): runs
 * fn(ctx, item, worker) for item in [0, n_items) with worker in [0, its thread count), returns
 * once all are done: 0, or nonzero when it could not run them (then ktl runs them itself). */
typedef void (*ktl_task_fn)(void *ctx, int64_t item, int worker);
typedef int (*ktl_parallel_for_fn)(ktl_task_fn fn, void *ctx, int64_t n_items);

/* A pool that starts no workers of its own: its parallel work goes to `parallel_for`, which
 * has `threads` workers (used to size the row chunks). Calls through one ktl pool are
 * serialised. NULL when fn is NULL or memory is short. */
ktl_pool *ktl_pool_create_external(ktl_parallel_for_fn parallel_for, int threads);
/* 1 when the pool runs its work on an external parallel-for. */
int ktl_pool_is_external(const ktl_pool *pool);

/* y[t, n] = sum_k x[t, k] * W[n, k]. */
int ktl_matmul(ktl_pool *pool, int qtype, const uint8_t *w, int64_t n, int64_t k,
               const float *x, int64_t t, float *y);

/* Routed experts of one MoE layer (see ktcore.ops.experts). Expert e is stored in slot
 * slot_of[e] of the stacked tensors (gate/up [slots, inter, hidden], down [slots, hidden, inter],
 * raw GGUF rows) or not owned when slot_of[e] < 0; slot_of has num_experts + 1 entries, the
 * last one (padding id) < 0. ids are int32 in [0, num_experts]. act: 0 silu, 1 gelu (erf),
 * 2 gelu_tanh, 3 relu. y[t, hidden] is overwritten. */
typedef struct ktl_experts_desc {
    int qtype_gate, qtype_up, qtype_down;
    const uint8_t *gate;
    const uint8_t *up;
    const uint8_t *down;
    int64_t num_experts, hidden, inter;
    const int32_t *slot_of;
    int act;
} ktl_experts_desc;

int ktl_experts(ktl_pool *pool, const ktl_experts_desc *desc, const float *x, int64_t t,
                const int32_t *ids, int64_t topk, const float *weights, float *y);

/* Asynchronous experts forward on fixed buffers (the job protocol of ktcore's
 * HostExpertsRunner, DESIGN section 5). x and y are [t, hidden] fp32 (dtype 0) or bf16
 * (dtype 1), ids [t, topk] int32 (ids_int64 = 0) or int64, weights [t, topk] fp32; desc is
 * copied (the weights and slot_of it points to must outlive the job). submit hands the job to
 * the pool's dispatcher thread and returns at once (after the previous run of this job, if
 * still in flight, has finished); the dispatcher runs it on the pool (own workers or the
 * external parallel-for). wait blocks until it is done and returns its status (0 or KTL_ERR_*;
 * KTL_ERR_NOT_SUBMITTED before the first submit). The host variants have the signature of a
 * CUDA host function (user data = the job) and drop the status: read it with wait. */
typedef struct ktl_job ktl_job;
ktl_job *ktl_job_create(ktl_pool *pool, const ktl_experts_desc *desc, int64_t t, int64_t topk,
                        const void *x, int x_dtype, const void *ids, int ids_int64,
                        const float *weights, void *y, int y_dtype);
void ktl_job_destroy(ktl_job *job);
int ktl_job_submit(ktl_job *job);
int ktl_job_wait(ktl_job *job);
void ktl_host_submit(void *job);
void ktl_host_wait(void *job);
/* Runs the job on the calling thread (after a posted run, if any) and returns its status;
 * ktl_host_run / ktl_host_done: that as a doorbell's submit and wait pair. */
int ktl_job_run(ktl_job *job);
void ktl_host_run(void *job);
void ktl_host_done(void *job);

/* Reads n bytes with all pool threads (a sum of 64-bit words); returns the sum so the reads
 * cannot be optimised away. The benchmark's read-bandwidth ceiling. */
uint64_t ktl_read_sum(ktl_pool *pool, const uint8_t *buf, int64_t n);

/* Activation quantisation exposed for tests: one row of k floats to the Q8_0-style (kind 1) or
 * Q8_K-style (kind 2) layout; q gets k int8, d k/32 or k/256 scales, sums k/32 int32 block sums
 * (kind 1) or k/16 int16 group sums (kind 2). */
int ktl_quantize_act(int kind, const float *x, int64_t k, int8_t *q, float *d, void *sums);

#endif
