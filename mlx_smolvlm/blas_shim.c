/* cblas_sgemm that sends single-row and single-column products to cblas_sgemv.
 *
 * MLX's CPU backend computes every fp32 matmul with cblas_sgemm, including the (1, K) @ (K, N)
 * products of token-by-token decoding. OpenBLAS before 0.3.27 (Debian 12 ships 0.3.21) runs
 * those through its packed GEMM path, which copies the whole weight matrix on every call: the
 * 49280 x 576 lm_head of SmolVLM2-256M takes 3x longer than the equivalent cblas_sgemv. This
 * library is loaded with global symbol visibility before libmlx.so, so MLX's cblas_sgemm
 * resolves here; everything else (and every true matrix-matrix product) goes to the BLAS given
 * to mlx_smolvlm_blas_shim_init.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
#include <pthread.h>

/* Small-M products C (M x N) = A (M x K) B^T with B stored N x K, as batched decoding makes them
 * (a few rows times a Linear weight). OpenBLAS 0.3.21 packs all of B on every such call; here
 * every row of B is read once, while it sits in L1, and dotted with the M rows of A. */
#define SMALL_M_MAX 16

typedef struct {
  int M, K, lda, ldb, ldc, n0, n1;
  const float *A, *B;
  float *C;
  float alpha, beta;
} small_job;

static inline void small_m_store(const small_job *j, int m, int n, float s) {
  float *c = j->C + (long)m * j->ldc + n;
  *c = j->alpha * s + (j->beta == 0.0f ? 0.0f : j->beta * *c);
}

static void *small_m_run(void *arg) {
  const small_job *j = (const small_job *)arg;
  const int K = j->K;
  int n = j->n0;
  for (; n + 4 <= j->n1; n += 4) { /* four rows of B per pass over each row of A */
    const float *w0 = j->B + (long)n * j->ldb, *w1 = w0 + j->ldb, *w2 = w1 + j->ldb,
                *w3 = w2 + j->ldb;
    for (int m = 0; m < j->M; m++) {
      const float *a = j->A + (long)m * j->lda;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int k = 0; k < K; k++) {
        s0 += w0[k] * a[k];
        s1 += w1[k] * a[k];
        s2 += w2[k] * a[k];
        s3 += w3[k] * a[k];
      }
      small_m_store(j, m, n, s0);
      small_m_store(j, m, n + 1, s1);
      small_m_store(j, m, n + 2, s2);
      small_m_store(j, m, n + 3, s3);
    }
  }
  for (; n < j->n1; n++) {
    const float *w = j->B + (long)n * j->ldb;
    for (int m = 0; m < j->M; m++) {
      const float *a = j->A + (long)m * j->lda;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int k = 0; k < K; k++) s += w[k] * a[k];
      small_m_store(j, m, n, s);
    }
  }
  return NULL;
}

/* Weights of 256K values or more are split over two threads by rows of B (same sums, so the
 * result does not depend on the split). */
static void small_m(int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                    int ldb, float beta, float *C, int ldc) {
  small_job jobs[2];
  int threads = ((long)N * K >= (1L << 20)) ? 2 : 1;
  for (int t = 0; t < threads; t++) {
    small_job j = {M, K, lda, ldb, ldc, (int)((long)N * t / threads),
                   (int)((long)N * (t + 1) / threads), A, B, C, alpha, beta};
    jobs[t] = j;
  }
  pthread_t helper;
  if (threads == 2 && pthread_create(&helper, NULL, small_m_run, &jobs[1]) != 0) {
    jobs[0].n1 = N;
    threads = 1;
  }
  small_m_run(&jobs[0]);
  if (threads == 2) pthread_join(helper, NULL);
}

enum { ROW_MAJOR = 101, COL_MAJOR = 102 };
enum { NO_TRANS = 111 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static long gemv_calls;

/* Without an init call, bind to the next definitions after this library. */
static void bind_next(void) {
  real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  real_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
}

/* Bind to the BLAS at `path` (already loaded or not). Returns 0 on success. */
int mlx_smolvlm_blas_shim_init(const char *path) {
  void *handle = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!handle) return 1;
  sgemm_fn gemm = (sgemm_fn)dlsym(handle, "cblas_sgemm");
  sgemv_fn gemv = (sgemv_fn)dlsym(handle, "cblas_sgemv");
  if (!gemm || !gemv) return 2;
  real_sgemm = gemm;
  real_sgemv = gemv;
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
