/* Quantized matrix-vector (and up to 8-row) products for MLX's CPU backend, and a Llama
 * decoder's layers built on them for decoding steps (the end of this file).
 *
 * C (M x N) = X (M x K) W^T, W stored as MLX's affine quantization (mx.quantize, mode "affine"):
 * row n holds K / (32 / bits) uint32 words, value k in bits [bits * (k % vals), ...) of word
 * k / vals (vals = 32 / bits values per word, lowest first), and W[n, k] = scale * q + bias with
 * one fp32 scale and bias per group of `group` consecutive values.
 * MLX's own CPU kernel for this is a scalar loop (about 1 GFLOP/s); here:
 *
 * - Blocks of 8 words (64 4-bit or 32 8-bit values) are unpacked with one mask and convert per
 *   8 values: lane l of the j-th unpacked vector holds value j of word l, left in place (times
 *   2^(j bits); the last one shifted down instead, its top bit would read as a sign). X is
 *   reordered and scaled once per call to match (xp[j][l] = x[block + l * vals + j] 2^-(j bits),
 *   exact), so every row of W meets it in that order and nothing is shuffled per weight.
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "helper_thread.h"

#define MAX_ROWS 8
#define MAX_MATRICES 4
#define PASS_ROWS 4
#define BLOCK_WORDS 8
#define CHUNK_ROWS 32
#define SPLIT_MIN_WORK (1L << 14) /* packed words, or attention multiply-adds */

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
          dot += (float)(q < vals - 1 ? v & (mask << (q * j->bits)) : v >> (q * j->bits)) *
                 xp[blk * vals + q * BLOCK_WORDS + l];
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
      /* Value q in place (times 2^(q bits), the input scaled to match): no shift. The last
       * is shifted down instead, as its top bit would make the integer negative. */
      __m256i value = q < vals - 1 ? _mm256_and_si256(v, _mm256_slli_epi32(mask, q * bits))
                                   : _mm256_srli_epi32(v, q * bits);
      __m256 wq = _mm256_cvtepi32_ps(value);
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

/* A job of `n_chunks` chunks, each computed by `run(job, chunk)`. */
typedef struct {
  void (*run)(const void *job, int chunk);
  const void *job;
} task;

static void run_task_chunk(const void *arg, int c) {
  const task *t = arg;
  t->run(t->job, c);
}

static helper_pool pool = HELPER_POOL(run_task_chunk);

/* Computes the chunks, with the helper thread when the job is worth it (`work`: its inner
 * loop's steps). */
static void run_tasks(void (*run)(const void *, int), const void *job, int n_chunks, long work) {
  task t = {run, job};
  if (work >= SPLIT_MIN_WORK && helper_share(&pool, &t, n_chunks)) return;
  for (int c = 0; c < n_chunks; c++) run(job, c);
}

static void run_chunk(const void *arg, int c) {
  const qjob *j = arg;
  int r0 = c * CHUNK_ROWS, r1 = r0 + CHUNK_ROWS < j->total_rows ? r0 + CHUNK_ROWS : j->total_rows;
  run_rows(j, r0, r1);
}

static void run_job(const qjob *j) {
  long words = (long)j->total_rows * j->K / (32 / j->bits);
  run_tasks(run_chunk, j, (j->total_rows + CHUNK_ROWS - 1) / CHUNK_ROWS, words);
}

/* ---- entry points -------------------------------------------------------------------------- */

/* Whether the AVX2 kernel runs (1) or the portable one (0); `force_portable` picks the latter. */
int mlx_smolvlm_qmv_init(int force_portable) {
  __builtin_cpu_init();
  have_avx2 = !force_portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return have_avx2;
}

/* C[:, column_i : column_i + rows_i] = X W_i^T for the job's matrices (bits and group checked
 * by the caller). Returns 0, or 2 when out of memory. */
static int product(int M, int K, int bits, int group, const float *x, int n_matrices,
                   const qmatrix *matrices, float *C, int ldc) {
  int vals = 32 / bits, words = K / vals;
  float *xp = malloc(sizeof(float) * ((size_t)M * K + (size_t)M * words));
  if (!xp) return 2;
  float *xs = xp + (size_t)M * K;
  for (int m = 0; m < M; m++)
    for (int word = 0; word < words; word++) {
      int blk = word / BLOCK_WORDS * BLOCK_WORDS, l = word % BLOCK_WORDS;
      float sum = 0.0f;
      for (int q = 0; q < vals; q++) {
        float v = x[(long)m * K + (long)word * vals + q];
        /* Scaled by 2^-(q bits), exactly, to meet value q left in place (see the kernels). */
        xp[(long)m * K + (long)blk * vals + q * BLOCK_WORDS + l] =
            q < vals - 1 ? ldexpf(v, -q * bits) : v;
        sum += v;
      }
      xs[(long)m * words + word] = sum;
    }
  qjob j = {M, K, bits, group, ldc, n_matrices, 0, {{0}}, xp, xs, C};
  for (int i = 0; i < n_matrices; i++) {
    j.matrices[i] = matrices[i];
    j.matrices[i].column = j.total_rows;
    j.total_rows += matrices[i].rows;
  }
  run_job(&j);
  free(xp);
  return 0;
}

static int takes(int M, int K, int bits, int group) {
  return (bits == 4 || bits == 8) && (group == 32 || group == 64 || group == 128) && M >= 1 &&
         M <= MAX_ROWS && K % (BLOCK_WORDS * 32 / bits) == 0 && K % group == 0;
}

/* C[:, column_i : column_i + rows_i] = X W_i^T for each of `n_matrices` matrices.
 *
 * x: M x K fp32, row-major. w, scales, biases: per matrix, as mx.quantize makes them (scales
 * and biases fp32). C: M rows of ldc floats. Returns 0, or 1 for arguments this kernel does not
 * take (bits other than 4/8, groups other than 32/64/128, K not a multiple of 8 words, M > 8). */
int mlx_smolvlm_qmv(int M, int K, int bits, int group, const float *x, int n_matrices,
                    const uint32_t *const *w, const float *const *scales,
                    const float *const *biases, const int *rows, float *C, int ldc) {
  if (!takes(M, K, bits, group) || n_matrices < 1 || n_matrices > MAX_MATRICES) return 1;
  qmatrix matrices[MAX_MATRICES];
  for (int i = 0; i < n_matrices; i++) matrices[i] = (qmatrix){w[i], scales[i], biases[i], rows[i], 0};
  return product(M, K, bits, group, x, n_matrices, matrices, C, ldc);
}

/* ---- the decoder's layers ----------------------------------------------------------------
 *
 * A Llama decoder for a few new rows (decoding steps: a token per sequence of a batch, or a
 * few tokens of one sequence) in one call: per layer RMSNorm, q/k/v, RoPE, attention over the
 * cached keys and values and the new ones, o_proj, residual, RMSNorm, gate/up, SiLU, down,
 * residual. The cache is read, not written: the call returns every layer's new keys and values
 * and the caller appends them (MLX owns the cache). Decoding then leaves MLX's graph once per
 * step instead of once per product. */

typedef struct {
  const uint32_t *w;
  const float *scales, *biases;
  int rows, bits, group;
} qlinear;

typedef struct {
  qlinear q, k, v, o, gate, up, down;
  const float *input_norm, *post_norm; /* RMSNorm weights */
} qlayer;

typedef struct {
  int hidden, intermediate, n_heads, n_kv_heads, head_dim;
  float norm_eps, rope_theta;
} qdims;

/* One layer's cache and new rows, as attention reads them. */
typedef struct {
  int M, L, n_heads, n_kv_heads, head_dim, q_width, qkv_width;
  int cached, capacity; /* cached columns; columns allocated per (row, head) */
  float scale;
  const float *keys, *values; /* B x n_kv_heads x capacity x head_dim, or NULL (cached 0) */
  const float *qkv;           /* M x qkv_width: the new queries, keys and values */
  const unsigned char *mask;  /* M x (cached + L), nonzero attends; NULL: causal */
  float *scores;              /* (M n_heads) x (cached + L), scratch */
  float *out;                 /* M x q_width */
} attention_job;

/* C = X [a; b; c]^T for linears of the same bits and group (b, c may be NULL). */
static int linears(int M, int K, const float *x, const qlinear *a, const qlinear *b,
                   const qlinear *c, float *C, int ldc) {
  const qlinear *all[3] = {a, b, c};
  qmatrix matrices[3];
  int n = 0;
  for (; n < 3 && all[n]; n++) {
    if (all[n]->bits != a->bits || all[n]->group != a->group) return 1;
    matrices[n] = (qmatrix){all[n]->w, all[n]->scales, all[n]->biases, all[n]->rows, 0};
  }
  if (!takes(M, K, a->bits, a->group)) return 1;
  return product(M, K, a->bits, a->group, x, n, matrices, C, ldc);
}

/* out = RMSNorm(x) * weight, per row of `n` values (as MLX: fp32 mean of squares). */
static void rms_norm(int M, int n, const float *x, const float *weight, float eps, float *out) {
  for (int m = 0; m < M; m++) {
    const float *xm = x + (long)m * n;
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += xm[i] * xm[i];
    float r = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[(long)m * n + i] = xm[i] * r * weight[i];
  }
}

/* Llama's RoPE on `heads` heads of a row at `position`: the two halves of each head rotated
 * (MLX's non-traditional rope), angles in fp32 as transformers computes them. */
static void rope(float *x, int heads, int head_dim, float theta, int position) {
  int half = head_dim / 2;
  for (int i = 0; i < half; i++) {
    float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
    float angle = (float)position * inv_freq, c = cosf(angle), s = sinf(angle);
    for (int h = 0; h < heads; h++) {
      float *x1 = x + (long)h * head_dim + i, *x2 = x1 + half;
      float a = *x1, b = *x2;
      *x1 = a * c - b * s;
      *x2 = b * c + a * s;
    }
  }
}

/* Eight partial sums, so that the compiler vectorizes without reassociating. */
static float dot(const float *a, const float *b, int n) {
  float acc[8] = {0};
  for (int i = 0; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
  float sum = 0.0f;
  for (int i = n / 8 * 8; i < n; i++) sum += a[i] * b[i];
  for (int l = 0; l < 8; l++) sum += acc[l];
  return sum;
}

/* out[s] = q . keys[s] for n keys of hd values, 4 keys at a time (one reduction per 4). */
__attribute__((target("avx2,fma"))) static void scores_avx2(const float *q, const float *keys,
                                                             int n, int hd, float *out) {
  int s = 0;
  for (; s + 4 <= n; s += 4) {
    const float *k = keys + (long)s * hd;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < hd; d += 8) {
      __m256 qv = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + d), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + hd + d), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * hd + d), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * hd + d), a3);
    }
    /* Lane i of the sum of both halves of hadd(hadd(a0, a1), hadd(a2, a3)) is key i's dot. */
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out + s, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
  for (; s < n; s++) out[s] = dot(q, keys + (long)s * hd, hd);
}

/* e^x for x <= 0 to about 1 ulp (Cephes' expf): 2^n times a polynomial in the remainder;
 * below -87 (where e^x < 2^-125) it gives e^-87 rather than a subnormal. */
__attribute__((target("avx2,fma"))) static __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

/* p[s] = e^(p[s] - top), 0 where p[s] is -inf (hidden); returns their sum. */
static float softmax_weights(float *p, int n, float top) {
  float total = 0.0f;
  for (int s = 0; s < n; s++) total += p[s] = p[s] == -INFINITY ? 0.0f : expf(p[s] - top);
  return total;
}

__attribute__((target("avx2,fma"))) static float softmax_weights_avx2(float *p, int n, float top) {
  __m256 sum = _mm256_setzero_ps(), hidden = _mm256_set1_ps(-INFINITY), tops = _mm256_set1_ps(top);
  int s = 0;
  for (; s + 8 <= n; s += 8) {
    __m256 x = _mm256_loadu_ps(p + s);
    __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, hidden, _CMP_EQ_OQ), exp_avx2(_mm256_sub_ps(x, tops)));
    _mm256_storeu_ps(p + s, e);
    sum = _mm256_add_ps(sum, e);
  }
  return hsum8(sum) + softmax_weights(p + s, n - s, top);
}

/* out[d] += sum over s of p[s] values[s][d], n values of hd; four chains per 8 values of d. */
__attribute__((target("avx2,fma"))) static void weighted_sum_avx2(const float *p, const float *values,
                                                                   int n, int hd, float *out) {
  for (int d = 0; d < hd; d += 8) {
    const float *v = values + d;
    __m256 a0 = _mm256_loadu_ps(out + d), a1 = _mm256_setzero_ps(), a2 = a1, a3 = a1;
    int s = 0;
    for (; s + 4 <= n; s += 4, v += 4L * hd) {
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), _mm256_loadu_ps(v), a0);
      a1 = _mm256_fmadd_ps(_mm256_set1_ps(p[s + 1]), _mm256_loadu_ps(v + hd), a1);
      a2 = _mm256_fmadd_ps(_mm256_set1_ps(p[s + 2]), _mm256_loadu_ps(v + 2 * hd), a2);
      a3 = _mm256_fmadd_ps(_mm256_set1_ps(p[s + 3]), _mm256_loadu_ps(v + 3 * hd), a3);
    }
    for (; s < n; s++, v += hd) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), _mm256_loadu_ps(v), a0);
    _mm256_storeu_ps(out + d, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  }
}

/* Attention of one new row `m` and one query head `h` (chunk m * n_heads + h): scores against
 * the cached keys and the new ones, softmax over the visible columns, values weighted. */
static void attend(const void *arg, int chunk) {
  const attention_job *j = arg;
  int m = chunk / j->n_heads, h = chunk % j->n_heads, hd = j->head_dim;
  int b = m / j->L, l = m % j->L, kv = h / (j->n_heads / j->n_kv_heads);
  int columns = j->cached + j->L, vector = have_avx2 && hd % 8 == 0;
  const float *q = j->qkv + (long)m * j->qkv_width + (long)h * hd;
  const float *cache_k = j->keys + ((long)b * j->n_kv_heads + kv) * j->capacity * hd;
  const float *cache_v = j->values + ((long)b * j->n_kv_heads + kv) * j->capacity * hd;
  /* New row i's key and value of this kv head. */
  const float *new_k = j->qkv + (long)b * j->L * j->qkv_width + j->q_width + (long)kv * hd;
  const float *new_v = new_k + (long)j->n_kv_heads * hd;
  float *p = j->scores + (long)chunk * columns, top = -INFINITY;
  if (vector)
    scores_avx2(q, cache_k, j->cached, hd, p);
  else
    for (int s = 0; s < j->cached; s++) p[s] = dot(q, cache_k + (long)s * hd, hd);
  for (int i = 0; i < j->L; i++) p[j->cached + i] = dot(q, new_k + (long)i * j->qkv_width, hd);
  for (int s = 0; s < columns; s++) {
    int visible = j->mask ? j->mask[(long)m * columns + s] != 0 : s <= j->cached + l;
    p[s] = visible ? p[s] * j->scale : -INFINITY;
    if (p[s] > top) top = p[s];
  }
  float total = vector ? softmax_weights_avx2(p, columns, top) : softmax_weights(p, columns, top);
  float *out = j->out + (long)m * j->q_width + (long)h * hd;
  memset(out, 0, sizeof(float) * hd);
  if (vector)
    weighted_sum_avx2(p, cache_v, j->cached, hd, out);
  else
    for (int s = 0; s < j->cached; s++)
      for (int d = 0; d < hd; d++) out[d] += p[s] * cache_v[(long)s * hd + d];
  for (int i = 0; i < j->L; i++)
    for (int d = 0; d < hd; d++) out[d] += p[j->cached + i] * new_v[(long)i * j->qkv_width + d];
  for (int d = 0; d < hd; d++) out[d] /= total;
}

/* The phases of a layer that `mlx_smolvlm_decode` times (benchmarks/profile_decode.py). */
enum { NORMS, QKV, ROPE, ATTENTION, O_PROJ, RESIDUALS, GATE_UP, SILU_MUL, DOWN, N_PHASES };

/* Adds the time since `*last` to phase `phase` (when timing) and restarts the clock. */
static void lap(long *phase_ns, int phase, long *last) {
  if (!phase_ns) return;
  long now = now_ns();
  phase_ns[phase] += now - *last;
  *last = now;
}

/* Decode M = B * L new rows (L per sequence) through `n_layers` layers.
 *
 * h: M x hidden, the input embeddings; the last layer's output on return (before the final
 * norm). positions: each row's position (RoPE). keys, values: per layer, the cache (B x
 * n_kv_heads x capacity x head_dim fp32), NULL when `cached` is 0. mask: M x (cached + L),
 * nonzero attends, or NULL for causal (row l of a sequence sees columns <= cached + l).
 * new_kv: n_layers x 2 x B x n_kv_heads x L x head_dim: each layer's new keys (RoPE applied)
 * and values, in the cache's layout. phase_ns: NULL, or N_PHASES counters that each phase's nanoseconds are added to.
 * Returns 0, 1 for weights this kernel does not take, or 2 when out of memory. */
int mlx_smolvlm_decode(const qdims *d, const qlayer *layers, int n_layers, int M, int L, float *h,
                       const int *positions, const float *const *keys,
                       const float *const *values, int cached, int capacity,
                       const unsigned char *mask, float *new_kv, long *phase_ns) {
  int D = d->hidden, I = d->intermediate, hd = d->head_dim;
  int q_width = d->n_heads * hd, kv_width = d->n_kv_heads * hd, qkv_width = q_width + 2 * kv_width;
  size_t columns = (size_t)cached + L;
  float *x = malloc(sizeof(float) * M * (2 * D + 3 * I + qkv_width + q_width + d->n_heads * columns));
  if (!x) return 2;
  float *y = x + (size_t)M * D, *gate_up = y + (size_t)M * D, *act = gate_up + (size_t)M * 2 * I;
  float *qkv = act + (size_t)M * I, *attn = qkv + (size_t)M * qkv_width;
  float *scores = attn + (size_t)M * q_width;
  int status = 0;
  long last = phase_ns ? now_ns() : 0;
  for (int i = 0; i < n_layers && !status; i++) {
    const qlayer *layer = &layers[i];
    rms_norm(M, D, h, layer->input_norm, d->norm_eps, x);
    lap(phase_ns, NORMS, &last);
    status = linears(M, D, x, &layer->q, &layer->k, &layer->v, qkv, qkv_width);
    if (status) break;
    lap(phase_ns, QKV, &last);
    float *new_keys = new_kv + (size_t)i * 2 * M * kv_width, *new_values = new_keys + M * kv_width;
    for (int m = 0; m < M; m++) {
      float *row = qkv + (long)m * qkv_width;
      rope(row, d->n_heads, hd, d->rope_theta, positions[m]);
      rope(row + q_width, d->n_kv_heads, hd, d->rope_theta, positions[m]);
      for (int k = 0; k < d->n_kv_heads; k++) { /* to (B, n_kv_heads, L, head_dim) */
        long at = (((long)(m / L) * d->n_kv_heads + k) * L + m % L) * hd;
        memcpy(new_keys + at, row + q_width + (long)k * hd, sizeof(float) * hd);
        memcpy(new_values + at, row + q_width + kv_width + (long)k * hd, sizeof(float) * hd);
      }
    }
    lap(phase_ns, ROPE, &last);
    attention_job job = {M, L, d->n_heads, d->n_kv_heads, hd, q_width, qkv_width, cached,
                         capacity, 1.0f / sqrtf((float)hd), keys ? keys[i] : NULL,
                         values ? values[i] : NULL, qkv, mask, scores, attn};
    run_tasks(attend, &job, M * d->n_heads, (long)M * d->n_heads * (cached + L) * hd);
    lap(phase_ns, ATTENTION, &last);
    status = linears(M, q_width, attn, &layer->o, NULL, NULL, y, D);
    if (status) break;
    lap(phase_ns, O_PROJ, &last);
    for (long k = 0; k < (long)M * D; k++) h[k] += y[k];
    lap(phase_ns, RESIDUALS, &last);
    rms_norm(M, D, h, layer->post_norm, d->norm_eps, x);
    lap(phase_ns, NORMS, &last);
    status = linears(M, D, x, &layer->gate, &layer->up, NULL, gate_up, 2 * I);
    if (status) break;
    lap(phase_ns, GATE_UP, &last);
    for (int m = 0; m < M; m++)
      for (int k = 0; k < I; k++) {
        float g = gate_up[(long)m * 2 * I + k], u = gate_up[(long)m * 2 * I + I + k];
        act[(long)m * I + k] = g / (1.0f + expf(-g)) * u; /* -0 for g < -88, as MLX */
      }
    lap(phase_ns, SILU_MUL, &last);
    status = linears(M, I, act, &layer->down, NULL, NULL, y, D);
    if (status) break;
    lap(phase_ns, DOWN, &last);
    for (long k = 0; k < (long)M * D; k++) h[k] += y[k];
    lap(phase_ns, RESIDUALS, &last);
  }
  free(x);
  return status;
}
