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
  real_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
