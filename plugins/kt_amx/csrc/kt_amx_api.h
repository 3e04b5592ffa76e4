/* kt_amx public C API.
 *
 * This header is read twice: by the C compiler and, verbatim, by cffi's cdef parser
 * (kt_amx/_build.py). Keep it to plain declarations: no #include, no #if, no macros, no
 * function bodies, only the integer types cffi knows (int32_t, int64_t, size_t).
 *
 * Weights are owned by the caller (Python keeps the packed tensors alive); a kt_moe only
 * records their addresses. See kt_internal.h for the packed layouts.
 */

/* ISA levels, lowest first. */
enum { KT_ISA_NONE = 0, KT_ISA_AVX2 = 1, KT_ISA_AVX512 = 2, KT_ISA_AMX = 3 };
/* Packed weight formats. */
enum { KT_FMT_BF16 = 0, KT_FMT_INT8 = 1, KT_FMT_INT4 = 2 };
/* Element types of x and y. */
enum { KT_DT_F32 = 0, KT_DT_BF16 = 1 };
/* Expert activations (ktcore.ops.experts.ACTIVATIONS). */
enum { KT_ACT_SILU = 0, KT_ACT_GELU = 1, KT_ACT_GELU_TANH = 2, KT_ACT_RELU = 3 };

/* One stacked weight matrix [n_slots][n][k] of the owned experts, packed (kt_internal.h). */
typedef struct {
    const void *w;      /* packed 16-row panels */
    const void *scale;  /* [n_slots][n/16][k/group][16] fp16 or fp32; NULL for bf16 */
    const void *zmin;   /* same shape: additive term of w = s*q + m (affine int4); else NULL */
    int32_t n;
    int32_t k;
} kt_matrix;

typedef struct {
    int32_t format;       /* KT_FMT_* */
    int32_t group;        /* quantisation group along k (int8/int4); k itself = per channel */
    int32_t scale_f32;    /* 1: scales/mins are fp32, 0: fp16 */
    int32_t symmetric;    /* int4: 1 = implicit zero point 8 (zmin NULL), 0 = affine (zmin) */
    int32_t act;          /* KT_ACT_* */
    int32_t n_experts;    /* E of the layer (the padding id is E) */
    int32_t n_slots;      /* owned experts */
    int32_t hidden;       /* H */
    int32_t inter;        /* I */
    const int32_t *slot_of; /* [n_experts + 1]: global id -> local slot, -1 if not owned */
    kt_matrix gate;       /* [n_slots][I][H] */
    kt_matrix up;         /* [n_slots][I][H] */
    kt_matrix down;       /* [n_slots][H][I] */
} kt_layer;

typedef struct kt_moe kt_moe;
typedef struct kt_job kt_job;

/* --- CPU features and ISA dispatch --------------------------------------------------- */
/* Detects the CPU (cpuid + xgetbv only; on Linux requests AMX tile permission) and applies
 * KT_AMX_ISA. Idempotent. Returns the selected level. */
int kt_init(void);
/* Highest level this CPU and OS support (and this build compiled). */
int kt_isa_available(void);
/* Level the kernels use now. */
int kt_isa_selected(void);
/* Selects a level <= kt_isa_available(); returns the level now selected, or -1 when the
 * request is above what is available (nothing changes then). Not safe while jobs run. */
int kt_isa_select(int level);
/* Name of a level ("avx2", ...). */
const char *kt_isa_name(int level);
/* Why the last KT_AMX_ISA request was not honoured ("" if it was). */
const char *kt_isa_note(void);
/* 1 when this build emulates AMX tiles in C (test builds only). */
int kt_amx_emulated(void);

/* --- thread pool --------------------------------------------------------------------- */
/* Starts the process-wide pool of persistent workers (once); later calls return the size of
 * the running pool. pin: 1 = pin worker i to one physical core each. */
int kt_pool_start(int n_threads, int pin);
int kt_pool_size(void);
/* Physical cores this process may run on (one logical CPU per core). */
int kt_physical_cores(void);
/* Microseconds a worker (and a waiter) spins before sleeping. */
void kt_pool_set_spin_us(int us);
/* Starts the pool with worker i pinned to cpus[i] (cpus NULL: unpinned); like kt_pool_start
 * otherwise (the NUMA-aware placement is computed by kt_amx/numa.py). */
int kt_pool_start_cpus(int n_threads, const int32_t *cpus);
/* Logical CPU worker i is pinned to, -1 when unpinned or out of range. */
int kt_pool_worker_cpu(int worker);

/* --- the shared pool for other CPU plugins (DESIGN section 6) ------------------------- */
typedef void (*kt_task_fn)(void *ctx, int64_t item, int worker);
/* Runs fn(ctx, item, worker) for item = 0 .. n_items-1 on the pool's workers (each item once,
 * worker in [0, kt_pool_size())) and returns 0 when all are done; nonzero when the pool is
 * not started. Blocking. A kt-amx job running on the pool is waited for first (one job at a
 * time: calls serialise, they never interleave). Called from inside a pool task it runs the
 * items inline on the calling worker instead of deadlocking. */
int kt_pool_parallel_for(kt_task_fn fn, void *ctx, int64_t n_items);

/* --- NUMA placement -------------------------------------------------------------------- */
/* Page-aligned anonymous memory no thread has touched yet (mmap); NULL on failure. */
void *kt_numa_alloc(int64_t bytes);
void kt_numa_free(void *p, int64_t bytes);
/* Copies bytes from src to dst on the pool workers w with node_of_worker[w] == node (the
 * first writer of a page places it: first touch). mbind_node >= 0 also asks the kernel to
 * prefer that physical node for dst (mbind via syscall; ignored where unavailable).
 * n_workers: entries of node_of_worker. Returns 0 on success. */
int kt_numa_copy(void *dst, const void *src, int64_t bytes, const int32_t *node_of_worker, int32_t n_workers,
                 int32_t node, int32_t mbind_node);

/* --- layers --------------------------------------------------------------------------- */
/* Bytes of one expert's packed weights and of its scales (0 for bf16); -1 if invalid. */
int64_t kt_matrix_weight_bytes(int32_t format, int32_t n, int32_t k);
int64_t kt_matrix_scale_bytes(int32_t format, int32_t n, int32_t k, int32_t group, int32_t scale_f32);
/* Copies the descriptor; NULL with a message in err on invalid input. */
kt_moe *kt_moe_create(const kt_layer *desc, char *err, int32_t err_len);
void kt_moe_destroy(kt_moe *moe);
/* Grows the workspace to T tokens of top-k K (never shrinks). 0 on success. */
int kt_moe_reserve(kt_moe *moe, int32_t tokens, int32_t top_k);
size_t kt_moe_workspace_bytes(const kt_moe *moe);
/* A layer made of per-NUMA-node parts (kt_amx/numa.py). mode 0 (split): part j holds rows
 * [I_j0, I_j1) of gate/up and the matching columns of down of every owned expert; each part
 * computes a partial y (fp32) and the partials are summed in part order (deterministic).
 * mode 1 (mirror): every part is a full copy; part j computes the active experts (those with
 * routed pairs in this forward, in slot order) of rank j, j + n, j + 2n, ... into its partial.
 * Part j runs on the pool workers w with node_of_worker[w] == j (a part with no worker
 * borrows worker j % n). The parts stay owned by the caller and must outlive the layer. */
kt_moe *kt_moe_combine(kt_moe *const *parts, int32_t n_parts, int32_t mode, const int32_t *node_of_worker,
                       int32_t n_workers, char *err, int32_t err_len);

/* --- jobs: one forward of one layer ---------------------------------------------------- */
kt_job *kt_job_create(void);
void kt_job_destroy(kt_job *job);
/* x [T][H] (KT_DT_*), ids [T][K] int32 or int64, weights [T][K] fp32, y [T][H] like x.
 * n_threads: workers taking part (0 = the whole pool). The workspace must be reserved. */
int kt_job_set(kt_job *job, kt_moe *moe, int32_t tokens, int32_t top_k,
               const void *x, int32_t x_dtype, const void *ids, int32_t ids_int64,
               const float *weights, void *y, int32_t n_threads);
/* Hands the job to the pool and returns at once. 0 on success. */
int kt_submit(kt_job *job);
/* Blocks until the job is done; returns its status (0 = ok). */
int kt_wait(kt_job *job);
/* submit + wait. */
int kt_run(kt_job *job);
/* Benchmarks on the pool's workers (n_threads, 0 = all). kind 1: every worker reads its share
 * of `bytes` at p; kind 2: every worker runs `iters` rounds of the ISA's int8 dot-product
 * instruction (AMX tiles, vpdpbusd or vpmaddubsw). Returns the seconds it took; *ops gets the
 * int8 operations done (kind 2). */
double kt_pool_bench(int32_t kind, const void *p, int64_t bytes, int64_t iters, int32_t n_threads, int64_t *ops);
/* --- dense linear layers: one packed matrix [n][k] (like one expert's) + optional bias --- */
typedef struct {
    int32_t format;       /* KT_FMT_* */
    int32_t group;        /* as kt_layer */
    int32_t scale_f32;
    int32_t symmetric;
    int32_t out_features; /* columns of y actually written (<= weight.n) */
    kt_matrix weight;     /* n a multiple of 16 (zero rows past out_features), k of 32 */
    const float *bias;    /* [out_features] or NULL */
} kt_dense;
typedef struct kt_linear kt_linear;
kt_linear *kt_linear_create(const kt_dense *desc, char *err, int32_t err_len);
void kt_linear_destroy(kt_linear *lin);
/* Grows the workspace to T rows. 0 on success. */
int kt_linear_reserve(kt_linear *lin, int32_t tokens);
/* y [T][out_features] = x [T][k] W^T + b, x and y both KT_DT_* of x_dtype. Run with kt_run
 * (or kt_submit/kt_wait). */
int kt_linear_set(kt_job *job, kt_linear *lin, int32_t tokens, const void *x, int32_t x_dtype, void *y,
                  int32_t n_threads);
/* Bytes the one-token int4/int8 kernels prefetch ahead in the weight stream (0 = none). */
void kt_set_prefetch(int32_t bytes);
int32_t kt_get_prefetch(void);
/* The same two as void (*)(void *) callbacks for cudaLaunchHostFunc (user data = kt_job *). */
void kt_host_submit(void *job);
void kt_host_wait(void *job);
/* --- doorbells: host jobs rung from a CUDA stream through mapped memory (doorbell.c) ---- */
typedef struct kt_doorbell kt_doorbell;
/* req and done: int32 words in page-locked, device-mapped memory (on separate cache lines). */
kt_doorbell *kt_doorbell_create(int32_t *req, int32_t *done, int32_t capacity);
/* An entry (the job protocol's submit / wait functions and their user data); returns its
 * code (>= 1) for the stream to write into req, -1 when full. */
int32_t kt_doorbell_add(kt_doorbell *d, void *submit, void *wait, void *job);
/* Forgets an entry (only while no stream can ring it): its code is then answered at once. */
void kt_doorbell_remove(kt_doorbell *d, int32_t code);
/* Starts the watcher thread (cpu -1: unpinned; spin_us: spinning after each request before
 * it polls with sleeps). 0 on success or when already running. */
int kt_doorbell_start(kt_doorbell *d, int cpu, int spin_us);
void kt_doorbell_stop(kt_doorbell *d);
int kt_doorbell_running(kt_doorbell *d);
/* Requests answered by running a job (unknown 0) or at once for an unknown code (1). */
int64_t kt_doorbell_count(kt_doorbell *d, int32_t unknown);
/* Sums over answered requests (ns): out[0] in submit, out[1] in wait, out[2] from the previous
 * answer to this request when under 5 ms (the stream's work between two jobs), out[3] those. */
void kt_doorbell_times(kt_doorbell *d, int64_t *out);
void kt_doorbell_destroy(kt_doorbell *d);
