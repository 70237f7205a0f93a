/* cblas_sgemm that sends single-row and single-column products to cblas_sgemv.
 *
 * MLX's CPU backend computes every fp32 matmul with cblas_sgemm, including the (1, K) @ (K, N)
 * products of token-by-token decoding. OpenBLAS before 0.3.27 (Debian 12 ships 0.3.21) runs
 * those through its packed GEMM path, which copies the whole weight matrix on every call: the
 * 49280 x 576 lm_head of SmolVLM2-256M takes 3x longer than the equivalent cblas_sgemv. This
 * library is loaded with global symbol visibility before libmlx.so, so MLX's cblas_sgemm
 * resolves here; everything else (and every true matrix-matrix product) goes to the BLAS given
 * to mlx_smolvlm_blas_shim_init.
 *
 * That BLAS may name its functions with a prefix (PyPI's scipy-openblas32 exports
 * scipy_cblas_sgemm, so that it never clashes with another BLAS): then this library is the only
 * way MLX reaches it, and it also forwards the other BLAS functions libmlx.so imports
 * (cblas_dgemm, cblas_cgemm).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "helper_thread.h"

/* Small-M products C (M x N) = A (M x K) B^T with B stored N x K, as decoding makes them (one
 * or a few rows times a Linear weight). OpenBLAS 0.3.21 packs all of B on every such call. Here
 * each tile of NR rows of B is read once, while it sits in L1, and dotted with MR rows of A at a
 * time, accumulating in MR x NR vector registers. Every dot product is summed in the same order
 * whatever M is and however N is split, so a row's result does not depend on its batch. */
#define SMALL_M_MAX 16
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#define MR 4
#define NR 4
typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));

typedef struct {
  int M, K, lda, ldb, ldc, n0, n1;
  const float *A, *B;
  float *C;
  float alpha, beta;
} small_job;

static inline float hsum(vec v) {
  float s = 0.0f;
  for (int l = 0; l < LANES; l++) s += v[l];
  return s;
}

/* C[m0:m0+mr, n:n+nr]; mr and nr are constants at each call, so the loops unroll into
 * registers. */
static inline __attribute__((always_inline)) void tile(const small_job *j, int m0, int mr, int n,
                                                      int nr) {
  const float *a[MR], *w[NR];
  vec acc[MR][NR];
  for (int i = 0; i < mr; i++) a[i] = j->A + (long)(m0 + i) * j->lda;
  for (int q = 0; q < nr; q++) w[q] = j->B + (long)(n + q) * j->ldb;
  for (int i = 0; i < mr; i++)
    for (int q = 0; q < nr; q++) acc[i][q] = (vec){0};
  int full = j->K / LANES * LANES;
  for (int k = 0; k < j->K; k += LANES) {
    const float *wk[NR], *ak[MR];
    float pad[MR + NR][LANES];
    for (int q = 0; q < nr; q++) {
      wk[q] = w[q] + k;
      /* The next tile's rows at the same k: rows of a few KB are too short for the hardware
       * prefetcher to ramp up on, and this makes 2-16-row products ~1.5x faster. Prefetches
       * past the matrix's end are harmless (they never fault). */
      __builtin_prefetch(wk[q] + (long)NR * j->ldb);
    }
    for (int i = 0; i < mr; i++) ak[i] = a[i] + k;
    if (k == full) { /* zero-pad the partial last vector: the tail is summed like the rest */
      memset(pad, 0, sizeof(pad));
      for (int q = 0; q < nr; q++) wk[q] = memcpy(pad[MR + q], wk[q], (j->K - k) * sizeof(float));
      for (int i = 0; i < mr; i++) ak[i] = memcpy(pad[i], ak[i], (j->K - k) * sizeof(float));
    }
    vec wv[NR];
    for (int q = 0; q < nr; q++) wv[q] = *(const vec *)wk[q];
    for (int i = 0; i < mr; i++) {
      vec av = *(const vec *)ak[i];
      for (int q = 0; q < nr; q++) acc[i][q] += av * wv[q];
    }
  }
  for (int i = 0; i < mr; i++)
    for (int q = 0; q < nr; q++) {
      float *c = j->C + (long)(m0 + i) * j->ldc + n + q;
      float s = j->alpha * hsum(acc[i][q]);
      *c = j->beta == 0.0f ? s : s + j->beta * *c;
    }
}

static inline __attribute__((always_inline)) void tile_rows(const small_job *j, int n, int nr) {
  int m = 0;
  for (; m + MR <= j->M; m += MR) tile(j, m, MR, n, nr);
  switch (j->M - m) {
    case 3: tile(j, m, 3, n, nr); break;
    case 2: tile(j, m, 2, n, nr); break;
    case 1: tile(j, m, 1, n, nr); break;
  }
}

static void small_m_run(const small_job *j) {
  int n = j->n0;
  for (; n + NR <= j->n1; n += NR) tile_rows(j, n, NR);
  for (; n < j->n1; n++) tile_rows(j, n, 1);
}

/* Large enough products are shared with a helper thread (helper_thread.h): the columns are cut
 * into CHUNKS chunks of a multiple of NR columns each. */
#define SPLIT_MIN_FMAS (1L << 16)
#define CHUNKS 16

typedef struct {
  small_job whole;
  int chunk; /* columns per chunk */
} split_job;

static void small_m_chunk(const void *arg, int c) {
  const split_job *s = arg;
  small_job part = s->whole;
  part.n0 = c * s->chunk;
  part.n1 = part.n0 + s->chunk < part.n1 ? part.n0 + s->chunk : part.n1;
  small_m_run(&part);
}

static helper_pool helper = HELPER_POOL(small_m_chunk);

static void small_m(int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                    int ldb, float beta, float *C, int ldc) {
  small_job job = {M, K, lda, ldb, ldc, 0, N, A, B, C, alpha, beta};
  if ((long)M * N * K < SPLIT_MIN_FMAS || N < 2 * NR) {
    small_m_run(&job);
    return;
  }
  split_job split = {job, (N + CHUNKS - 1) / CHUNKS};
  split.chunk = (split.chunk + NR - 1) / NR * NR;
  if (!helper_share(&helper, &split, (N + split.chunk - 1) / split.chunk)) small_m_run(&job);
}

enum { ROW_MAJOR = 101, COL_MAJOR = 102 };
enum { NO_TRANS = 111 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*dgemm_fn)(int, int, int, int, int, int, double, const double *, int,
                         const double *, int, double, double *, int);
/* Complex: alpha and beta are passed by pointer. */
typedef void (*cgemm_fn)(int, int, int, int, int, int, const void *, const void *, int,
                         const void *, int, const void *, void *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static dgemm_fn real_dgemm;
static cgemm_fn real_cgemm;
static long gemv_calls;

/* Without an init call, bind to the next definitions after this library. */
static void bind_next(void) {
  real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
  real_dgemm = (dgemm_fn)dlsym(RTLD_NEXT, "cblas_dgemm");
  real_cgemm = (cgemm_fn)dlsym(RTLD_NEXT, "cblas_cgemm");
}

static void *lookup(void *handle, const char *prefix, const char *name) {
  char full[128];
  if (snprintf(full, sizeof(full), "%s%s", prefix, name) >= (int)sizeof(full)) return NULL;
  return dlsym(handle, full);
}

/* Bind to the BLAS at `path` (already loaded or not), whose functions are named `prefix` +
 * the CBLAS name ("" for most builds, "scipy_" for scipy-openblas32). Returns 0 on success. */
int mlx_smolvlm_blas_shim_init(const char *path, const char *prefix) {
  void *handle = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!handle) return 1;
  sgemm_fn sgemm = (sgemm_fn)lookup(handle, prefix, "cblas_sgemm");
  sgemv_fn sgemv = (sgemv_fn)lookup(handle, prefix, "cblas_sgemv");
  dgemm_fn dgemm = (dgemm_fn)lookup(handle, prefix, "cblas_dgemm");
  cgemm_fn cgemm = (cgemm_fn)lookup(handle, prefix, "cblas_cgemm");
  if (!sgemm || !sgemv || !dgemm || !cgemm) return 2;
  real_sgemm = sgemm;
  real_sgemv = sgemv;
  real_dgemm = dgemm;
  real_cgemm = cgemm;
  return 0;
}

/* How many products went to sgemv so far (for tests). */
long mlx_smolvlm_blas_shim_gemv_calls(void) { return gemv_calls; }

static void zero_strided(float *y, int n, int inc) {
  if (inc == 1) {
    memset(y, 0, (size_t)n * sizeof(float));
    return;
  }
  for (int i = 0; i < n; i++) y[(long)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  if (!real_sgemm || !real_sgemv) bind_next();
  if (order == COL_MAJOR) {
    /* A column-major C is the row-major C^T = op(B)^T op(A)^T. */
    int t = trans_a; trans_a = trans_b; trans_b = t;
    t = M; M = N; N = t;
    t = lda; lda = ldb; ldb = t;
    const float *p = A; A = B; B = p;
    order = ROW_MAJOR;
  }
  if (K > 0 && (M == 1 || N == 1)) {
    /* OpenBLAS may scale y by beta = 0 as a multiplication, so uninitialized output memory
     * (MLX allocates it fresh) could leave NaNs: clear it first. */
    if (M == 1) {
      /* C (1 x N) = a (1 x K) op(B) (K x N), i.e. c = op(B)^T a. */
      int inc_a = trans_a == NO_TRANS ? 1 : lda;
      if (beta == 0.0f) zero_strided(C, N, 1);
      if (trans_b == NO_TRANS) /* B is K x N */
        real_sgemv(ROW_MAJOR, 112, K, N, alpha, B, ldb, A, inc_a, beta, C, 1);
      else /* B is stored N x K */
        real_sgemv(ROW_MAJOR, NO_TRANS, N, K, alpha, B, ldb, A, inc_a, beta, C, 1);
    } else {
      /* C (M x 1) = op(A) (M x K) b (K x 1). */
      int inc_b = trans_b == NO_TRANS ? ldb : 1;
      if (beta == 0.0f) zero_strided(C, M, ldc);
      if (trans_a == NO_TRANS) /* A is M x K */
        real_sgemv(ROW_MAJOR, NO_TRANS, M, K, alpha, A, lda, B, inc_b, beta, C, ldc);
      else /* A is stored K x M */
        real_sgemv(ROW_MAJOR, 112, K, M, alpha, A, lda, B, inc_b, beta, C, ldc);
    }
    gemv_calls++;
    return;
  }
  if (K > 0 && M <= SMALL_M_MAX && trans_a == NO_TRANS && trans_b != NO_TRANS) {
    small_m(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  real_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* The other products libmlx.so imports go to the BLAS unchanged. */
void cblas_dgemm(int order, int trans_a, int trans_b, int M, int N, int K, double alpha,
                 const double *A, int lda, const double *B, int ldb, double beta, double *C,
                 int ldc) {
  if (!real_dgemm) bind_next();
  real_dgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_cgemm(int order, int trans_a, int trans_b, int M, int N, int K, const void *alpha,
                 const void *A, int lda, const void *B, int ldb, const void *beta, void *C,
                 int ldc) {
  if (!real_cgemm) bind_next();
  real_cgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
