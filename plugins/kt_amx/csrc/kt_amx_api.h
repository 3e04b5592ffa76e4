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
/* The same two as void (*)(void *) callbacks for cudaLaunchHostFunc (user data = kt_job *). */
void kt_host_submit(void *job);
void kt_host_wait(void *job);
