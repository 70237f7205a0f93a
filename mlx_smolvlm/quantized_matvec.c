/* Quantized matrix-vector (and up to 8-row) products for MLX's CPU backend.
 *
 * C (M x N) = X (M x K) W^T, W stored as MLX's affine quantization (mx.quantize, mode "affine"):
 * row n holds K / (32 / bits) uint32 words, value k in bits [bits * (k % vals), ...) of word
 * k / vals (vals = 32 / bits values per word, lowest first), and W[n, k] = scale * q + bias with
 * one fp32 scale and bias per group of `group` consecutive values.
 * MLX's own CPU kernel for this is a scalar loop (about 1 GFLOP/s); here:
 *
 * - Blocks of 8 words (64 4-bit or 32 8-bit values) are unpacked with one shift, mask and
 *   convert per 8 values: lane l of the j-th unpacked vector holds value j of word l. X is
 *   reordered once per call to match (xp[j][l] = x[block + l * vals + j]), so every row of W
 *   meets it in that order and nothing is shuffled per weight.
 * - Per block, the 8 lanes' sums of x * q are multiplied by each lane's group scale, and each
 *   lane's bias by its word's sum of x (also made once per call), all in vector registers; one
 *   horizontal sum per output. Groups of 32 put two groups in one block (lanes 0-3, 4-7).
 * - AVX2 with FMA where the CPU has it (checked at run time), else the same arithmetic in plain
 *   C. Up to 4 rows of X share each unpacked block (more rows: in passes of 4, the weight row
 *   then read again from L1).
 * - Several matrices with the same input (q/k/v, gate/up) are one job, so Python waits once for
 *   them. Their rows are cut into chunks that the caller and one persistent helper thread claim
 *   one at a time (both cores; a helper the OS has not scheduled costs nothing).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "helper_thread.h"

#define MAX_ROWS 8
#define MAX_MATRICES 4
#define PASS_ROWS 4
#define BLOCK_WORDS 8
#define CHUNK_ROWS 32
#define SPLIT_MIN_WORDS (1L << 14)

typedef struct {
  const uint32_t *w;
  const float *scales, *biases;
  int rows;   /* output features of this matrix */
  int column; /* its first column in C */
} qmatrix;

typedef struct {
  int M, K, bits, group, ldc, n_matrices, total_rows;
  qmatrix matrices[MAX_MATRICES];
  const float *xp; /* M x K, reordered per block */
  const float *xs; /* M x (K / vals), the sum of x over each word's values */
  float *C;
} qjob;

static int have_avx2;

/* ---- one output row, portable C ---------------------------------------------------------- */

static void row_scalar(const qjob *j, const qmatrix *mt, int n, int m0, int mr) {
  int vals = 32 / j->bits, words = j->K / vals, wpg = j->group / vals;
  unsigned mask = (1u << j->bits) - 1;
  const uint32_t *w = mt->w + (long)n * words;
  const float *s = mt->scales + (long)n * (j->K / j->group);
  const float *b = mt->biases + (long)n * (j->K / j->group);
  for (int m = m0; m < m0 + mr; m++) {
    const float *xp = j->xp + (long)m * j->K, *xs = j->xs + (long)m * words;
    float acc[BLOCK_WORDS] = {0};
    for (int blk = 0; blk < words; blk += BLOCK_WORDS) {
      for (int l = 0; l < BLOCK_WORDS; l++) {
        uint32_t v = w[blk + l];
        float dot = 0.0f;
        for (int q = 0; q < vals; q++)
          dot += (float)((v >> (q * j->bits)) & mask) * xp[blk * vals + q * BLOCK_WORDS + l];
        int g = (blk + l) / wpg;
        acc[l] += s[g] * dot + b[g] * xs[blk + l];
      }
    }
    float sum = 0.0f;
    for (int l = 0; l < BLOCK_WORDS; l++) sum += acc[l];
    j->C[(long)m * j->ldc + mt->column + n] = sum;
  }
}

/* ---- one output row, AVX2 + FMA -------------------------------------------------------- */

__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* The block's per-lane group scale or bias: lanes 0-3 and 4-7 differ only for groups of 32
 * 4-bit values (4 words). */
__attribute__((target("avx2,fma"))) static inline __m256 lanes(const float *v, int blk, int wpg) {
  if (wpg >= BLOCK_WORDS) return _mm256_set1_ps(v[blk / wpg]);
  return _mm256_setr_m128(_mm_set1_ps(v[blk / wpg]), _mm_set1_ps(v[blk / wpg + 1]));
}

/* `mr` and `bits` are constants at each call site, so the accumulators stay in registers.
 * With few rows, each row's sum is split over independent chains: one chain would wait on the
 * FMA latency (4 cycles) at every step. */
__attribute__((target("avx2,fma"), always_inline)) static inline void row_avx2_pass(
    const qjob *j, const qmatrix *mt, int n, int m0, int mr, int bits) {
  const int vals = 32 / bits, words = j->K / vals, wpg = j->group / vals;
  const int chains = mr == 1 ? 4 : mr == 2 ? 2 : 1;
  const uint32_t *w = mt->w + (long)n * words;
  const float *s = mt->scales + (long)n * (j->K / j->group);
  const float *b = mt->biases + (long)n * (j->K / j->group);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  __m256 acc[PASS_ROWS];
  for (int m = 0; m < mr; m++) acc[m] = _mm256_setzero_ps();
  for (int blk = 0; blk < words; blk += BLOCK_WORDS) {
    __m256i v = _mm256_loadu_si256((const __m256i *)(w + blk));
    __m256 dot[PASS_ROWS][4];
    for (int m = 0; m < mr; m++)
      for (int c = 0; c < chains; c++) dot[m][c] = _mm256_setzero_ps();
    for (int q = 0; q < vals; q++) {
      __m256i shifted = _mm256_srlv_epi32(v, _mm256_set1_epi32(q * bits));
      __m256 wq = _mm256_cvtepi32_ps(_mm256_and_si256(shifted, mask));
      for (int m = 0; m < mr; m++) {
        const float *xp = j->xp + (long)(m0 + m) * j->K + blk * vals + q * BLOCK_WORDS;
        dot[m][q % chains] = _mm256_fmadd_ps(wq, _mm256_loadu_ps(xp), dot[m][q % chains]);
      }
    }
    __m256 sv = lanes(s, blk, wpg), bv = lanes(b, blk, wpg);
    for (int m = 0; m < mr; m++) {
      __m256 d = dot[m][0];
      for (int c = 1; c < chains; c++) d = _mm256_add_ps(d, dot[m][c]);
      const float *xs = j->xs + (long)(m0 + m) * words + blk;
      acc[m] = _mm256_fmadd_ps(sv, d, acc[m]);
      acc[m] = _mm256_fmadd_ps(bv, _mm256_loadu_ps(xs), acc[m]);
    }
  }
  for (int m = 0; m < mr; m++) j->C[(long)(m0 + m) * j->ldc + mt->column + n] = hsum8(acc[m]);
}

#define PASS(BITS)                                                                   \
  __attribute__((target("avx2,fma"))) static void row_avx2_##BITS(                   \
      const qjob *j, const qmatrix *mt, int n, int m0, int mr) {                     \
    switch (mr) {                                                                    \
      case 1: row_avx2_pass(j, mt, n, m0, 1, BITS); break;                           \
      case 2: row_avx2_pass(j, mt, n, m0, 2, BITS); break;                           \
      case 3: row_avx2_pass(j, mt, n, m0, 3, BITS); break;                           \
      default: row_avx2_pass(j, mt, n, m0, 4, BITS); break;                          \
    }                                                                                \
  }
PASS(4)
PASS(8)

/* Rows [r0, r1) of the job's stacked matrices, for every row of X. */
static void run_rows(const qjob *j, int r0, int r1) {
  int first = 0;
  for (int i = 0; i < j->n_matrices; first += j->matrices[i++].rows) {
    const qmatrix *mt = &j->matrices[i];
    int lo = r0 > first ? r0 - first : 0, hi = r1 - first < mt->rows ? r1 - first : mt->rows;
    for (int n = lo; n < hi; n++)
      for (int m0 = 0; m0 < j->M; m0 += PASS_ROWS) {
        int mr = j->M - m0 < PASS_ROWS ? j->M - m0 : PASS_ROWS;
        if (!have_avx2)
          row_scalar(j, mt, n, m0, mr);
        else if (j->bits == 4)
          row_avx2_4(j, mt, n, m0, mr);
        else
          row_avx2_8(j, mt, n, m0, mr);
      }
  }
}

/* ---- sharing with the helper thread (helper_thread.h) -------------------------------------- */

static void run_chunk(const void *arg, int c) {
  const qjob *j = arg;
  int r0 = c * CHUNK_ROWS, r1 = r0 + CHUNK_ROWS < j->total_rows ? r0 + CHUNK_ROWS : j->total_rows;
  run_rows(j, r0, r1);
}

static helper_pool pool = HELPER_POOL(run_chunk);

static void run_job(const qjob *j) {
  long words = (long)j->total_rows * j->K / (32 / j->bits);
  int n_chunks = (j->total_rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
  if (words < SPLIT_MIN_WORDS || !helper_share(&pool, j, n_chunks)) run_rows(j, 0, j->total_rows);
}

/* ---- entry points -------------------------------------------------------------------------- */

/* Whether the AVX2 kernel runs (1) or the portable one (0); `force_portable` picks the latter. */
int mlx_smolvlm_qmv_init(int force_portable) {
  __builtin_cpu_init();
  have_avx2 = !force_portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return have_avx2;
}

/* C[:, column_i : column_i + rows_i] = X W_i^T for each of `n_matrices` matrices.
 *
 * x: M x K fp32, row-major. w, scales, biases: per matrix, as mx.quantize makes them (scales
 * and biases fp32). C: M rows of ldc floats. Returns 0, or 1 for arguments this kernel does not
 * take (bits other than 4/8, groups other than 32/64/128, K not a multiple of 8 words, M > 8). */
int mlx_smolvlm_qmv(int M, int K, int bits, int group, const float *x, int n_matrices,
                    const uint32_t *const *w, const float *const *scales,
                    const float *const *biases, const int *rows, float *C, int ldc) {
  if ((bits != 4 && bits != 8) || (group != 32 && group != 64 && group != 128) || M < 1 ||
      M > MAX_ROWS || n_matrices < 1 || n_matrices > MAX_MATRICES)
    return 1;
  int vals = 32 / bits;
  if (K % (BLOCK_WORDS * vals) != 0 || K % group != 0) return 1;
  int words = K / vals;
  float *xp = malloc(sizeof(float) * ((size_t)M * K + (size_t)M * words));
  if (!xp) return 2;
  float *xs = xp + (size_t)M * K;
  for (int m = 0; m < M; m++)
    for (int word = 0; word < words; word++) {
      int blk = word / BLOCK_WORDS * BLOCK_WORDS, l = word % BLOCK_WORDS;
      float sum = 0.0f;
      for (int q = 0; q < vals; q++) {
        float v = x[(long)m * K + (long)word * vals + q];
        xp[(long)m * K + (long)blk * vals + q * BLOCK_WORDS + l] = v;
        sum += v;
      }
      xs[(long)m * words + word] = sum;
    }
  qjob j = {M, K, bits, group, ldc, n_matrices, 0, {{0}}, xp, xs, C};
  for (int i = 0; i < n_matrices; i++) {
    j.matrices[i] = (qmatrix){w[i], scales[i], biases[i], rows[i], j.total_rows};
    j.total_rows += rows[i];
  }
  run_job(&j);
  free(xp);
  return 0;
}
