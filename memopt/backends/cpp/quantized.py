"""Matmuls over narrow weights for the CPU: the dequantization fused into the GEMV.

A decode step multiplies one activation row by every weight matrix: each weight element
is read once and used once, so the step's time is the weight bytes over the bandwidth.
These kernels read the weights as they are stored (int8, packed int4 or bfloat16),
widen them to float32 in registers and accumulate in float32; the float32 weight is never
written anywhere. `y[m, n] = sum_k x[m, k] * W[n, k]`, W (N, K) stored row by row:

- int8: `W[n, k] = q[n, k] * scale[n]` (one scale per output channel);
- int4: groups of `group` consecutive k per row (the last one shorter when `group` does
  not divide K; K even), `W[n, k] = (nibble - 8) * scale[n, g]`. A group of L elements is
  L / 2 bytes: element j in the low nibble of byte j for j < L/2, in the high nibble of
  byte j - L/2 otherwise. The two halves are two
  contiguous runs of x, so the inner loop vectorizes without shuffles;
- bf16: `W[n, k]` the high 16 bits of a float32.

Rows of W are split across the OpenMP threads; each row is read once for all `M` rows of
x (x stays in L1/L2: decode has M = 1). For more than GEMV_ROWS rows `matmul` below
dequantizes tiles of rows (`*_rows`, 4 MiB of float32, reused) and hands them to the
graph's GEMM library (option `cpu_gemm`, runtime/gemm.py: oneDNN on the EPYC, where a
1024-token prefill of the large Llama took 1.5 s through ATen's MKL against 0.8 s in
float32 on oneDNN): only there does a float32 copy of W exist, a tile at a time. Many
rows of int8 weights with int8 activations are instead one integer GEMM where the
processor has VNNI (`integer_gemm`, `_integer_matmul`: x quantized per row).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from memopt.backends.cpp import build, launcher
from memopt.backends.narrow import QuantizedWeight
from memopt.backends.runtime.gemm import onednn_addmm

# Rows of x at most this many: the fused GEMV (it reads each weight row once and uses it for
# every row of x, so its work grows with M while the BLAS's blocked GEMM does not).
GEMV_ROWS = 4
# int8 activations with int8 weights: elements of x per scale.
ACTIVATION_BLOCK = 128
# Weight rows dequantized per BLAS call for larger M: 4 MiB of float32 (measured: 1 MiB
# tiles cost 1.2-1.8x the float32 GEMM at M = 128, 4 MiB 1.0-1.2x; 16 MiB no better).
TILE_BYTES = 4 << 20

SOURCE = r"""
// memopt's dequantizing matmuls (memopt/backends/cpp/quantized.py).
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#else  // a compiler without OpenMP: one thread
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Weights stream from memory once a step: a row is 0.5-3 KiB, too short for the hardware
// prefetchers to run ahead of two threads (measured: 14.7 GB/s from memory for an int8
// GEMV without, 36 with software prefetches 4 KiB ahead, 38 at 8 KiB; torch.sum 25). Past
// the last row the hint is dropped: prefetches do not fault.
static inline void prefetch(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + 4096, 0, 3);
}

// Dot products of float32 x with one narrow weight row, widened in registers. The
// compiler does not vectorize the widening well (GCC 12: 4-wide SLP, 6 GB/s a core), so
// x86 gets intrinsics; other CPUs the plain loops.
#if defined(__AVX512F__)
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
static inline float dot_q8(const float* x, const int8_t* q, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    prefetch(q + k);
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + k))));
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + k + 16))));
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), w0, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), w1, a1);
  }
  float acc = hsum(_mm512_add_ps(a0, a1));
  for (; k < K; ++k) acc += x[k] * static_cast<float>(q[k]);
  return acc;
}
// One row of x times one int4 row: per group, sum_j x * nibble with the nibbles' offset of 8
// not taken off (`xsum` holds 8 * each group's sum of x, subtracted once a group), scaled.
// Vector accumulators run across groups; one horizontal sum a row.
static inline float row_q4(const float* x, const uint8_t* b, const float* scale,
                           const float* xsum, int64_t K, int64_t group) {
  const int64_t groups = (K + group - 1) / group;
  const __m512i low = _mm512_set1_epi32(15);
  __m512 total = _mm512_setzero_ps();
  float tail = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t half = (g + 1 < groups ? group : K - g * group) / 2;
    const float* lo = x + g * group;
    const float* hi = lo + half;
    const uint8_t* bytes = b + g * (group / 2);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= half; j += 16) {
      prefetch(bytes + j);
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(bytes + j)));
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(lo + j), _mm512_cvtepi32_ps(_mm512_and_si512(v, low)), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(hi + j), _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), a1);
    }
    float rest = -xsum[g];
    for (; j < half; ++j) {
      const int32_t v = bytes[j];
      rest += lo[j] * static_cast<float>(v & 15) + hi[j] * static_cast<float>(v >> 4);
    }
    total = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(scale[g]), total);
    tail += rest * scale[g];
  }
  return hsum(total) + tail;
}
// `row_q4` for rows of whole groups of GROUP elements (K a multiple of GROUP), GROUP known
// to the compiler: each group's loop has a fixed length, unrolled, with no remainder, and
// the same sums in the same order (measured, int4 GEMVs of 128-element groups, from L3 or
// from memory: 1.15-1.3x faster).
#define MEMOPT_WHOLE_GROUPS 1
template <int64_t GROUP>
static inline float row_q4_whole(const float* x, const uint8_t* b, const float* scale,
                                 const float* xsum, int64_t K) {
  static_assert(GROUP % 32 == 0, "a group is a whole number of 16-byte loads");
  const int64_t groups = K / GROUP;
  const __m512i low = _mm512_set1_epi32(15);
  __m512 total = _mm512_setzero_ps();
  float tail = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const float* lo = x + g * GROUP;
    const float* hi = lo + GROUP / 2;
    const uint8_t* bytes = b + g * (GROUP / 2);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    #pragma GCC unroll 16
    for (int64_t j = 0; j < GROUP / 2; j += 16) {
      if (j % 64 == 0) prefetch(bytes + j);  // once a 64-byte line
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(bytes + j)));
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(lo + j), _mm512_cvtepi32_ps(_mm512_and_si512(v, low)), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(hi + j), _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), a1);
    }
    total = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(scale[g]), total);
    tail -= xsum[g] * scale[g];  // row_q4's `rest` with no element past the 16s
  }
  return hsum(total) + tail;
}
static inline float dot_bf16(const float* x, const uint16_t* w, int64_t K) {
  __m512 a0 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    prefetch(w + k);
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + k)));
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), a0);
  }
  float acc = hsum(a0);
  for (; k < K; ++k) acc += x[k] * bf16_to_float(w[k]);
  return acc;
}
static inline float dot_f32(const float* x, const float* w, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    prefetch(w + k);
    prefetch(w + k + 16);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
  }
  float acc = hsum(_mm512_add_ps(a0, a1));
  for (; k < K; ++k) acc += x[k] * w[k];
  return acc;
}
// Four consecutive rows of w (row stride K) against x at once: y[r] = x . w[r].
static inline void dot4_f32(const float* x, const float* w, int64_t K, float* y) {
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    prefetch(w0 + k);
    prefetch(w1 + k);
    prefetch(w2 + k);
    prefetch(w3 + k);
    const __m512 v = _mm512_loadu_ps(x + k);
    a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(w0 + k), a0);
    a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(w1 + k), a1);
    a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(w2 + k), a2);
    a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(w3 + k), a3);
  }
  float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
  for (; k < K; ++k) {
    s0 += x[k] * w0[k];
    s1 += x[k] * w1[k];
    s2 += x[k] * w2[k];
    s3 += x[k] * w3[k];
  }
  y[0] = s0, y[1] = s1, y[2] = s2, y[3] = s3;
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float dot_q8(const float* x, const int8_t* q, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    prefetch(q + k);
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + k))));
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + k + 8))));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), w0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), w1, a1);
  }
  float acc = hsum(_mm256_add_ps(a0, a1));
  for (; k < K; ++k) acc += x[k] * static_cast<float>(q[k]);
  return acc;
}
static inline float row_q4(const float* x, const uint8_t* b, const float* scale,
                           const float* xsum, int64_t K, int64_t group) {
  const int64_t groups = (K + group - 1) / group;
  const __m256i low = _mm256_set1_epi32(15);
  __m256 total = _mm256_setzero_ps();
  float tail = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t half = (g + 1 < groups ? group : K - g * group) / 2;
    const float* lo = x + g * group;
    const float* hi = lo + half;
    const uint8_t* bytes = b + g * (group / 2);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= half; j += 8) {
      prefetch(bytes + j);
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(bytes + j)));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(lo + j), _mm256_cvtepi32_ps(_mm256_and_si256(v, low)), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(hi + j), _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), a1);
    }
    float rest = -xsum[g];
    for (; j < half; ++j) {
      const int32_t v = bytes[j];
      rest += lo[j] * static_cast<float>(v & 15) + hi[j] * static_cast<float>(v >> 4);
    }
    total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(scale[g]), total);
    tail += rest * scale[g];
  }
  return hsum(total) + tail;
}
static inline float dot_bf16(const float* x, const uint16_t* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    prefetch(w + k);
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + k)));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), a0);
  }
  float acc = hsum(a0);
  for (; k < K; ++k) acc += x[k] * bf16_to_float(w[k]);
  return acc;
}
static inline float dot_f32(const float* x, const float* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    prefetch(w + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(w + k + 8), a1);
  }
  float acc = hsum(_mm256_add_ps(a0, a1));
  for (; k < K; ++k) acc += x[k] * w[k];
  return acc;
}
#else
static inline float dot_q8(const float* x, const int8_t* q, int64_t K) {
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) acc += x[k] * static_cast<float>(q[k]);
  return acc;
}
static inline float row_q4(const float* x, const uint8_t* b, const float* scale,
                           const float* xsum, int64_t K, int64_t group) {
  const int64_t groups = (K + group - 1) / group;
  float total = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t half = (g + 1 < groups ? group : K - g * group) / 2;
    const float* lo = x + g * group;
    const float* hi = lo + half;
    float acc = -xsum[g];
    for (int64_t j = 0; j < half; ++j) {
      const int32_t v = b[g * (group / 2) + j];
      acc += lo[j] * static_cast<float>(v & 15) + hi[j] * static_cast<float>(v >> 4);
    }
    total += acc * scale[g];
  }
  return total;
}
static inline float dot_bf16(const float* x, const uint16_t* w, int64_t K) {
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) acc += x[k] * bf16_to_float(w[k]);
  return acc;
}
static inline float dot_f32(const float* x, const float* w, int64_t K) {
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) acc += x[k] * w[k];
  return acc;
}
#endif
#if !defined(__AVX512F__)  // a row at a time: four at once was measured with AVX-512 only
static inline void dot4_f32(const float* x, const float* w, int64_t K, float* y) {
  for (int r = 0; r < 4; ++r) y[r] = dot_f32(x, w + r * K, K);
}
#endif

extern "C" void memopt_q8_matmul(const float* x, const int8_t* q, const float* scale,
                                 const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_q8(x + m * K, q + n * K, K) * scale[n] + (bias ? bias[n] : 0.0f);
}

extern "C" void memopt_q4_matmul(const float* x, const uint8_t* packed, const float* scale,
                                 const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                                 int64_t group) {
  const int64_t groups = (K + group - 1) / group;  // the last one shorter if group does not divide K
  std::vector<float> xsum(M * groups);  // 8 * each group's sum of x: the nibbles' offset
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t k = g * group; k < K && k < (g + 1) * group; ++k) s += x[m * K + k];
      xsum[m * groups + g] = 8.0f * s;
    }
#ifdef MEMOPT_WHOLE_GROUPS
  if (group == 128 && K % 128 == 0) {  // the default group size, every group whole
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t m = 0; m < M; ++m)
        y[m * N + n] = row_q4_whole<128>(x + m * K, packed + n * (K / 2), scale + n * groups,
                                         xsum.data() + m * groups, K) + (bias ? bias[n] : 0.0f);
    return;
  }
#endif
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m)
      y[m * N + n] = row_q4(x + m * K, packed + n * (K / 2), scale + n * groups,
                            xsum.data() + m * groups, K, group) + (bias ? bias[n] : 0.0f);
}

extern "C" void memopt_bf16_matmul(const float* x, const uint16_t* w, const float* bias,
                                   float* y, int64_t M,
                                   int64_t N, int64_t K) {
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_bf16(x + m * K, w + n * K, K) + (bias ? bias[n] : 0.0f);
}

// --- float32 weights: the same streaming GEMV, nothing to widen -------------------------
//
// W (N, K) row-major (an nn.Linear weight: mm's operand is its transposed view): dot
// products of four rows at once (with AVX-512; `dot4_f32` takes one at a time elsewhere),
// the last N % 4 one at a time. Four streams a thread keep
// more of the weight in flight than one: from memory 29-30 GB/s against 24-26 for a row
// at a time (Intel Xeon, 2 threads, 512 MB of (4096, 1024) and (1024, 2816) weights); from
// the last-level cache the two are within 4% (51-57 GB/s).
extern "C" void memopt_f32_matmul(const float* x, const float* w, const float* bias, float* y,
                                  int64_t M, int64_t N, int64_t K) {
  const int64_t blocks = N / 4;
  #pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < blocks + N % 4; ++i) {
    const int64_t n = i < blocks ? 4 * i : 4 * blocks + (i - blocks);
    const int64_t rows = i < blocks ? 4 : 1;
    for (int64_t m = 0; m < M; ++m) {
      float sums[4];
      if (rows == 4)
        dot4_f32(x + m * K, w + n * K, K, sums);
      else
        sums[0] = dot_f32(x + m * K, w + n * K, K);
      for (int64_t r = 0; r < rows; ++r) y[m * N + n + r] = sums[r] + (bias ? bias[n + r] : 0.0f);
    }
  }
}

// B (K, N) row-major (a Conv1D weight, mm's operand as stored): each thread streams a
// contiguous block of B's rows, `acc[m, :] += x[m, k] * B[k, :]` into a private
// accumulator row (in L1/L2) for each row of x, prefetching 4 KiB ahead; then the
// threads' sums are added. (One run of columns a thread, every row, read B in short
// strided pieces: 34 GB/s from memory against 52 for the (N, K) kernel.)
//
// Each accumulator row starts 64-byte aligned, at the offset modulo 4 KiB farthest from
// its thread's first rows' offsets (`apart`). In a vector's memory (16-byte aligned from
// malloc) each 64-byte store into it spanned two cache lines, and the weight rows' offset
// from it was wherever the allocation fell; where the memory reads fast both showed.
// GPT-2's four projections of a layer, from memory (AMD EPYC, 2 threads, 16 products a
// pass): in a vector's memory 46-49 GB/s in one process, 55-67 in others; 16 bytes off
// the alignment, 2 KiB off the rows 63-70; aligned and 2 KiB off 76-82; four rows at a
// time 84-90 there, but 10-15% slower than one where the memory read at 50-60 GB/s.
// Where the memory is slow, all of them stream alike.
constexpr int64_t KN_ROWS = 4;  // the first rows `apart` keeps away from

static float* apart(float* base, const float* b, int64_t N, int64_t rows) {
  int best = 0, farthest = -1;
  for (int c = 0; c < 4096; c += 64) {
    int nearest = 4096;
    for (int64_t i = 0; i < rows; ++i) {
      int d = (c - static_cast<int>(reinterpret_cast<uintptr_t>(b + i * N) & 4095)) & 4095;
      d = std::min(d, 4096 - d);
      nearest = std::min(nearest, d);
    }
    if (nearest > farthest) {
      farthest = nearest;
      best = c;
    }
  }
  const int have = static_cast<int>(reinterpret_cast<uintptr_t>(base) & 4095);
  return base + ((best - have) & 4095) / 4;
}

extern "C" void memopt_f32_matmul_kn(const float* x, const float* b, const float* bias,
                                     float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t most = omp_get_max_threads();
  const int64_t row_stride = N + 1024;  // room to move a row up to 4 KiB - 4 bytes on
  std::vector<float> partial(most * M * row_stride, 0.0f);
  std::vector<float*> acc(most * M);
  int64_t used = 1;
  #pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    #pragma omp single
    used = threads;
    const int64_t k0 = K * t / threads, k1 = K * (t + 1) / threads;
    float** own = acc.data() + t * M;
    for (int64_t m = 0; m < M; ++m)
      own[m] = apart(partial.data() + (t * M + m) * row_stride, b + k0 * N, N,
                     std::min(KN_ROWS, k1 - k0));
    for (int64_t k = k0; k < k1; ++k) {
      const float* row = b + k * N;
      for (int64_t m = 0; m < M; ++m) {
        const float xv = x[m * K + k];
        float* out = own[m];
        int64_t n = 0;
        for (; n + 16 <= N; n += 16) {
          prefetch(row + n);
          #pragma omp simd
          for (int64_t j = n; j < n + 16; ++j) out[j] += xv * row[j];
        }
        for (; n < N; ++n) out[n] += xv * row[n];
      }
    }
  }
  #pragma omp parallel for schedule(static) if (M * N >= 4096)
  for (int64_t i = 0; i < M * N; ++i) {
    const int64_t m = i / N, n = i % N;
    float s = bias ? bias[n] : 0.0f;
    for (int64_t t = 0; t < used; ++t) s += acc[t * M + m][n];
    y[i] = s;
  }
}

// The float32 GEMVs' entry points for memopt's native launcher (cpp/launcher.py: one C
// call from Python, the data pointers read in C): p = [bias,] x, w, y as mm/addmm take
// them; s = M, N, K, whether a bias comes first.
extern "C" int32_t memopt_f32_matmul_packed(void* const* p, const int64_t* s) {
  const int64_t o = s[3];
  memopt_f32_matmul((const float*)p[o], (const float*)p[o + 1], o ? (const float*)p[0] : nullptr,
                    (float*)p[o + 2], s[0], s[1], s[2]);
  return 0;
}
extern "C" int32_t memopt_f32_matmul_kn_packed(void* const* p, const int64_t* s) {
  const int64_t o = s[3];
  memopt_f32_matmul_kn((const float*)p[o], (const float*)p[o + 1],
                       o ? (const float*)p[0] : nullptr, (float*)p[o + 2], s[0], s[1], s[2]);
  return 0;
}

// --- int8 activations: x quantized a block at a time, integer dot products -------------
//
// x (M, K) becomes int8 values `xq` with one float scale per block of B elements of a row
// (`sx = max|block| / 127`, round to nearest even) and each block's sum of values. With
// VNNI (`vpdpbusd`: 64 unsigned x signed byte products a instruction, summed in int32) the
// product needs one unsigned operand: int4's nibbles are (q + 8), unsigned already; int8
// weights are made unsigned by flipping their sign bit (q + 128), and 128 * sum(xq) is taken
// off again. Without VNNI the same integers are multiplied in plain loops.

static void quantize_x(const float* x, int64_t M, int64_t K, int64_t B, int8_t* xq,
                       float* sx, int32_t* xsum) {
  const int64_t blocks = (K + B - 1) / B;
  // Rows in parallel once there are enough of them (a prefill); plain loops the compiler
  // vectorizes (max of |x|, a division and a round-to-nearest-even a lane).
  #pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t start = b * B, end = start + B < K ? start + B : K;
      const float* row = x + m * K;
      float amax = 0.0f;
      #pragma omp simd reduction(max : amax)
      for (int64_t k = start; k < end; ++k) amax = std::max(amax, std::fabs(row[k]));
      // The max passes over a NaN: a block holding a NaN or an infinity (x * 0 is NaN for
      // both) gets a NaN scale and zero values, so its row's outputs are NaN, not finite.
      float probe = 0.0f;
      #pragma omp simd reduction(+ : probe)
      for (int64_t k = start; k < end; ++k) probe += row[k] * 0.0f;
      const bool finite = probe == probe;
      const float s = !finite ? NAN : amax > 0.0f ? amax / 127.0f : 1.0f;
      int32_t sum = 0;
      int8_t* q = xq + m * K;
      for (int64_t k = start; k < end; ++k) {
        // rintf rounds to nearest even (the default rounding mode), as torch.round does
        const int32_t v = finite ? static_cast<int32_t>(__builtin_rintf(row[k] / s)) : 0;
        q[k] = static_cast<int8_t>(v);
        sum += v;
      }
      sx[m * blocks + b] = s;
      xsum[m * blocks + b] = sum;
    }
}

// Many rows with int8 weights and int8 activations: x quantized a row at a time (one scale
// a row) for an integer GEMM, whose int32 products are then scaled by the row's and the
// output channel's scales (and the bias added) as they are stored.
extern "C" void memopt_quantize_rows(const float* x, int8_t* xq, float* sx, int64_t M,
                                     int64_t K) {
  std::vector<int32_t> xsum(M);
  quantize_x(x, M, K, K, xq, sx, xsum.data());
}

extern "C" void memopt_scale_int32(const int32_t* y, const float* sx, const float* sw,
                                   const float* bias, float* out, int64_t M, int64_t N) {
  #pragma omp parallel for schedule(static) if (M * N >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    const float s = sx[m];
    const int32_t* row = y + m * N;
    float* dst = out + m * N;
    if (bias) {
      #pragma omp simd
      for (int64_t n = 0; n < N; ++n) dst[n] = static_cast<float>(row[n]) * (s * sw[n]) + bias[n];
    } else {
      #pragma omp simd
      for (int64_t n = 0; n < N; ++n) dst[n] = static_cast<float>(row[n]) * (s * sw[n]);
    }
  }
}

// Many rows with int4 weights and int8 activations: x quantized per group of the weight's
// (as the GEMV quantizes it), the weight's nibbles unpacked to int8 (q - 8, in K order),
// one integer GEMM a group (`_int_mm` on the group's columns: its products summed in
// int32, exactly), then out = bias + sum over groups of sx[m, g] * sw[g, n] * C[g, m, n].
extern "C" void memopt_quantize_blocks(const float* x, int8_t* xq, float* sx, int64_t M,
                                       int64_t K, int64_t B) {
  std::vector<int32_t> xsum(M * ((K + B - 1) / B));
  quantize_x(x, M, K, B, xq, sx, xsum.data());
}

extern "C" void memopt_q4_unpack_i8(const uint8_t* packed, int8_t* out, int64_t N, int64_t K,
                                    int64_t group) {
  const int64_t groups = (K + group - 1) / group;
  #pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t half = (g + 1 < groups ? group : K - g * group) / 2;
      const uint8_t* bytes = packed + n * (K / 2) + g * (group / 2);
      int8_t* dst = out + n * K + g * group;
      #pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        dst[j] = static_cast<int8_t>((bytes[j] & 15) - 8);
        dst[half + j] = static_cast<int8_t>((bytes[j] >> 4) - 8);
      }
    }
}

// Group g's products (M, N) int32 into out: out (the bias, or 0, for the first group) +=
// sx[m, g] * sw[n] * part[m, n]; sx (M, G), sw group g's row of W's scales, transposed (N).
extern "C" void memopt_scale_group(const int32_t* part, const float* sx, const float* sw,
                                   const float* bias, float* out, int64_t M, int64_t N,
                                   int64_t G, int64_t g) {
  #pragma omp parallel for schedule(static) if (M * N >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    float* dst = out + m * N;
    if (g == 0) {
      #pragma omp simd
      for (int64_t n = 0; n < N; ++n) dst[n] = bias ? bias[n] : 0.0f;
    }
    const float s = sx[m * G + g];
    const int32_t* row = part + m * N;
    #pragma omp simd
    for (int64_t n = 0; n < N; ++n) dst[n] += static_cast<float>(row[n]) * (s * sw[n]);
  }
}

// x as the int8 path sees it, back in float32 (xq * sx): the tiled path for many rows
// multiplies this, so those M get the GEMV's numbers (many rows of int8 weights on an
// integer GEMM are quantized a row at a time instead: memopt_quantize_rows).
extern "C" void memopt_quantize_x(const float* x, float* out, int64_t M, int64_t K, int64_t B) {
  const int64_t blocks = (K + B - 1) / B;
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * blocks);
  std::vector<int32_t> xsum(M * blocks);
  quantize_x(x, M, K, B, xq.data(), sx.data(), xsum.data());
  #pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const float s = sx[m * blocks + b];
      const int64_t end = (b + 1) * B < K ? (b + 1) * B : K;
      for (int64_t k = b * B; k < end; ++k) out[m * K + k] = xq[m * K + k] * s;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline float row_q8_a8(const int8_t* xq, const float* sx, const int32_t* xsum,
                              const int8_t* q, int64_t K, int64_t B) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 total = _mm512_setzero_ps();
  float tail = 0.0f;
  for (int64_t b = 0, start = 0; start < K; ++b, start += B) {
    const int64_t len = start + B < K ? B : K - start;
    __m512i acc = _mm512_setzero_si512();
    int64_t j = 0;
    int32_t covered = 0;  // sum of xq over the vector part: the sign flip's 128 * it
    for (; j + 64 <= len; j += 64) {
      prefetch(q + start + j);
      const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(q + start + j), flip);
      acc = _mm512_dpbusd_epi32(acc, w, _mm512_loadu_si512(xq + start + j));
    }
    int32_t rest = 0;
    for (int64_t k = j; k < len; ++k) {
      rest += static_cast<int32_t>(xq[start + k]) * q[start + k];
      covered -= xq[start + k];
    }
    covered += xsum[b];
    total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(sx[b]), total);
    tail += sx[b] * static_cast<float>(rest - 128 * covered);
  }
  return hsum(total) + tail;
}
static inline float row_q4_a8(const int8_t* xq, const float* sx, const int32_t* xsum,
                              const uint8_t* b, const float* scale, int64_t K, int64_t group) {
  const __m512i low = _mm512_set1_epi8(15);
  __m512 total = _mm512_setzero_ps();
  float tail = 0.0f;
  for (int64_t g = 0, start = 0; start < K; ++g, start += group) {
    const int64_t half = (start + group < K ? group : K - start) / 2;
    const uint8_t* bytes = b + g * (group / 2);
    __m512i acc = _mm512_setzero_si512();
    int64_t j = 0;
    for (; j + 64 <= half; j += 64) {
      prefetch(bytes + j);
      const __m512i v = _mm512_loadu_si512(bytes + j);
      const __m512i lo = _mm512_and_si512(v, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      acc = _mm512_dpbusd_epi32(acc, lo, _mm512_loadu_si512(xq + start + j));
      acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512(xq + start + half + j));
    }
    int32_t rest = 0;
    for (; j < half; ++j) {
      const int32_t v = bytes[j];
      rest += (v & 15) * xq[start + j] + (v >> 4) * xq[start + half + j];
    }
    const float f = scale[g] * sx[g];
    total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(f), total);
    tail += f * static_cast<float>(rest - 8 * xsum[g]);
  }
  return hsum(total) + tail;
}
#else
static inline float row_q8_a8(const int8_t* xq, const float* sx, const int32_t* xsum,
                              const int8_t* q, int64_t K, int64_t B) {
  (void)xsum;
  float total = 0.0f;
  for (int64_t b = 0, start = 0; start < K; ++b, start += B) {
    const int64_t end = start + B < K ? start + B : K;
    int32_t acc = 0;
    for (int64_t k = start; k < end; ++k) acc += static_cast<int32_t>(xq[k]) * q[k];
    total += sx[b] * static_cast<float>(acc);
  }
  return total;
}
static inline float row_q4_a8(const int8_t* xq, const float* sx, const int32_t* xsum,
                              const uint8_t* b, const float* scale, int64_t K, int64_t group) {
  float total = 0.0f;
  for (int64_t g = 0, start = 0; start < K; ++g, start += group) {
    const int64_t half = (start + group < K ? group : K - start) / 2;
    const uint8_t* bytes = b + g * (group / 2);
    int32_t acc = -8 * xsum[g];
    for (int64_t j = 0; j < half; ++j) {
      const int32_t v = bytes[j];
      acc += (v & 15) * xq[start + j] + (v >> 4) * xq[start + half + j];
    }
    total += scale[g] * sx[g] * static_cast<float>(acc);
  }
  return total;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The common shapes (every block or group a whole number of 64-byte chunks), two rows of W
// at a time: the two rows' loads and dot products interleave (the general functions above
// run one row's short dependency chains alone: measured 1.3 ms against 0.7 for an int4
// 32000 x 1024 GEMV from memory), and the per-block float work is one FMA a row.
static void pair_rows_q8(const int8_t* xq, const float* sx, float correction, const int8_t* q,
                         const float* scale, const float* bias, float* y, int64_t n, int64_t K,
                         int64_t B) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* r0 = q + n * K;
  const int8_t* r1 = r0 + K;
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
  for (int64_t b = 0, start = 0; start < K; ++b, start += B) {
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    for (int64_t j = start; j < start + B; j += 64) {
      prefetch(r0 + j);
      prefetch(r1 + j);
      const __m512i xv = _mm512_loadu_si512(xq + j);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_loadu_si512(r0 + j), flip), xv);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_xor_si512(_mm512_loadu_si512(r1 + j), flip), xv);
    }
    const __m512 s = _mm512_set1_ps(sx[b]);
    t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), s, t0);
    t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), s, t1);
  }
  y[n] = scale[n] * (hsum(t0) - correction) + (bias ? bias[n] : 0.0f);
  y[n + 1] = scale[n + 1] * (hsum(t1) - correction) + (bias ? bias[n + 1] : 0.0f);
}
static void pair_rows_q4(const int8_t* xq, const float* sx, const float* correction,
                         const uint8_t* packed, const float* scale, const float* bias, float* y,
                         int64_t n, int64_t K, int64_t group) {
  const __m512i low = _mm512_set1_epi8(15);
  const int64_t groups = K / group, half = group / 2;
  const uint8_t* b0 = packed + n * (K / 2);
  const uint8_t* b1 = b0 + K / 2;
  const float* s0 = scale + n * groups;
  const float* s1 = s0 + groups;
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
  float c0 = 0.0f, c1 = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    for (int64_t j = 0; j < half; j += 64) {
      const uint8_t* p0 = b0 + g * half + j;
      const uint8_t* p1 = b1 + g * half + j;
      prefetch(p0);
      prefetch(p1);
      const __m512i lo = _mm512_loadu_si512(xq + g * group + j);
      const __m512i hi = _mm512_loadu_si512(xq + g * group + half + j);
      const __m512i v0 = _mm512_loadu_si512(p0), v1 = _mm512_loadu_si512(p1);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v0, low), lo);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(v1, low), lo);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(_mm512_srli_epi16(v0, 4), low), hi);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(v1, 4), low), hi);
    }
    t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), _mm512_set1_ps(s0[g] * sx[g]), t0);
    t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), _mm512_set1_ps(s1[g] * sx[g]), t1);
    c0 += s0[g] * correction[g];
    c1 += s1[g] * correction[g];
  }
  y[n] = hsum(t0) - c0 + (bias ? bias[n] : 0.0f);
  y[n + 1] = hsum(t1) - c1 + (bias ? bias[n + 1] : 0.0f);
}
#define MEMOPT_PAIRED_ROWS 1
#else
#define MEMOPT_PAIRED_ROWS 0
#endif

extern "C" void memopt_q8_matmul_a8(const float* x, const int8_t* q, const float* scale,
                                    const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                                    int64_t B) {
  const int64_t blocks = (K + B - 1) / B;
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * blocks);
  std::vector<int32_t> xsum(M * blocks);
  quantize_x(x, M, K, B, xq.data(), sx.data(), xsum.data());
#if MEMOPT_PAIRED_ROWS
  if (M == 1 && K % B == 0 && B % 64 == 0) {  // one row of x: W streams once
    for (int64_t m = 0; m < M; ++m) {
      float correction = 0.0f;  // the sign flip's 128 * sum(xq), scaled, over the blocks
      for (int64_t b = 0; b < blocks; ++b) correction += sx[m * blocks + b] * 128.0f * xsum[m * blocks + b];
      const int8_t* xm = xq.data() + m * K;
      const float* sm = sx.data() + m * blocks;
      #pragma omp parallel for schedule(static)
      for (int64_t n = 0; n < N - 1; n += 2)
        pair_rows_q8(xm, sm, correction, q, scale, bias, y + m * N, n, K, B);
      if (N % 2)
        y[m * N + N - 1] = scale[N - 1] * row_q8_a8(xm, sm, xsum.data() + m * blocks,
                                                    q + (N - 1) * K, K, B) +
                           (bias ? bias[N - 1] : 0.0f);
    }
    return;
  }
#endif
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m)
      y[m * N + n] = scale[n] * row_q8_a8(xq.data() + m * K, sx.data() + m * blocks,
                                          xsum.data() + m * blocks, q + n * K, K, B) +
                     (bias ? bias[n] : 0.0f);
}

extern "C" void memopt_q4_matmul_a8(const float* x, const uint8_t* packed, const float* scale,
                                    const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                                    int64_t group) {
  const int64_t groups = (K + group - 1) / group;
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * groups);
  std::vector<int32_t> xsum(M * groups);
  quantize_x(x, M, K, group, xq.data(), sx.data(), xsum.data());
#if MEMOPT_PAIRED_ROWS
  if (M == 1 && K % group == 0 && group % 128 == 0) {  // one row of x: W streams once
    std::vector<float> correction(groups);  // the nibbles' offset: 8 * sum(xq) * sx, a group
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xm = xq.data() + m * K;
      const float* sm = sx.data() + m * groups;
      for (int64_t g = 0; g < groups; ++g) correction[g] = sm[g] * 8.0f * xsum[m * groups + g];
      #pragma omp parallel for schedule(static)
      for (int64_t n = 0; n < N - 1; n += 2)
        pair_rows_q4(xm, sm, correction.data(), packed, scale, bias, y + m * N, n, K, group);
      if (N % 2)
        y[m * N + N - 1] = row_q4_a8(xm, sm, xsum.data() + m * groups,
                                     packed + (N - 1) * (K / 2), scale + (N - 1) * groups, K,
                                     group) +
                           (bias ? bias[N - 1] : 0.0f);
    }
    return;
  }
#endif
  #pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m)
      y[m * N + n] = row_q4_a8(xq.data() + m * K, sx.data() + m * groups,
                               xsum.data() + m * groups, packed + n * (K / 2),
                               scale + n * groups, K, group) +
                     (bias ? bias[n] : 0.0f);
}

// Row n of W as float32 into out (K floats).
static inline void q8_row(const int8_t* q, const float* scale, float* out, int64_t n,
                          int64_t K) {
  const int8_t* src = q + n * K;
  const float s = scale[n];
  #pragma omp simd
  for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(src[k]) * s;
}

static inline void q4_row(const uint8_t* packed, const float* scale, float* out, int64_t n,
                          int64_t K, int64_t group) {
  const int64_t groups = (K + group - 1) / group;
  const uint8_t* src = packed + n * (K / 2);
  const float* row_scale = scale + n * groups;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t half = (g + 1 < groups ? group : K - g * group) / 2;
    const uint8_t* bytes = src + g * (group / 2);
    const float s = row_scale[g];
    float* dst = out + g * group;
    #pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const int32_t b = bytes[j];
      dst[j] = static_cast<float>((b & 15) - 8) * s;
      dst[half + j] = static_cast<float>((b >> 4) - 8) * s;
    }
  }
}

static inline void bf16_row(const uint16_t* w, float* out, int64_t n, int64_t K) {
  const uint16_t* src = w + n * K;
  #pragma omp simd
  for (int64_t k = 0; k < K; ++k) out[k] = bf16_to_float(src[k]);
}

// Rows [n0, n0 + rows) of W as float32, row-major, into out (rows x K).
extern "C" void memopt_q8_rows(const int8_t* q, const float* scale, float* out, int64_t n0,
                               int64_t rows, int64_t K) {
  #pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) q8_row(q, scale, out + r * K, n0 + r, K);
}

extern "C" void memopt_q4_rows(const uint8_t* packed, const float* scale, float* out,
                               int64_t n0, int64_t rows, int64_t K, int64_t group) {
  #pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) q4_row(packed, scale, out + r * K, n0 + r, K, group);
}

extern "C" void memopt_bf16_rows(const uint16_t* w, float* out, int64_t n0, int64_t rows,
                                 int64_t K) {
  #pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) bf16_row(w, out + r * K, n0 + r, K);
}

// Rows `index[0..count)` of W (N rows) as float32 into out (count x K): an embedding
// lookup. kind: 0 int8, 1 int4, 2 bf16 (no scale). Returns 1, writing nothing, where an
// index is outside [0, N) (the caller then indexes as torch does: negative ones wrap).
// `low`: the least index taken (0, or -N where a negative one counts from the end).
static int32_t gather_rows(int64_t kind, const void* data, const float* scale,
                           const int64_t* index, float* out, int64_t count, int64_t N,
                           int64_t K, int64_t group, int64_t low) {
  for (int64_t i = 0; i < count; ++i)
    if (index[i] < low || index[i] >= N) return 1;
  #pragma omp parallel for schedule(static) if (count * K >= 65536)
  for (int64_t i = 0; i < count; ++i) {
    const int64_t r = index[i] < 0 ? index[i] + N : index[i];
    float* row = out + i * K;
    if (kind == 0) q8_row((const int8_t*)data, scale, row, r, K);
    else if (kind == 1) q4_row((const uint8_t*)data, scale, row, r, K, group);
    else bf16_row((const uint16_t*)data, row, r, K);
  }
  return 0;
}
extern "C" int32_t memopt_gather_rows(int64_t kind, const void* data, const float* scale,
                                      const int64_t* index, float* out, int64_t count,
                                      int64_t N, int64_t K, int64_t group) {
  return gather_rows(kind, data, scale, index, out, count, N, K, group, 0);
}
// The lookup's entry point for the native launcher: p = index (contiguous int64), the
// stored weight (data[, scale]), out; s = kind, count, N, K, group, whether a scale is
// stored, the least index taken (-N: a negative one counts from the end, as torch's
// indexing does; 0: index_select's rule). Returns 1, writing nothing, where one is out of
// range (torch raises there).
extern "C" int32_t memopt_gather_rows_packed(void* const* p, const int64_t* s) {
  const int64_t scaled = s[5];
  return gather_rows(s[0], p[1], scaled ? (const float*)p[2] : nullptr, (const int64_t*)p[0],
                     (float*)p[2 + scaled], s[1], s[2], s[3], s[4], s[6]);
}
// The narrow GEMVs' entry points for the native launcher: p = x[, bias], the stored weight
// (data, scale; bf16 has no scale), y; s = M, N, K, whether a bias is given, and the int4
// group or the int8 activations' block (the kernels' last argument) where they take one.
extern "C" int32_t memopt_q8_matmul_packed(void* const* p, const int64_t* s) {
  const int64_t o = s[3];
  memopt_q8_matmul((const float*)p[0], (const int8_t*)p[1 + o], (const float*)p[2 + o],
                   o ? (const float*)p[1] : nullptr, (float*)p[3 + o], s[0], s[1], s[2]);
  return 0;
}
extern "C" int32_t memopt_q4_matmul_packed(void* const* p, const int64_t* s) {
  const int64_t o = s[3];
  memopt_q4_matmul((const float*)p[0], (const uint8_t*)p[1 + o], (const float*)p[2 + o],
                   o ? (const float*)p[1] : nullptr, (float*)p[3 + o], s[0], s[1], s[2], s[4]);
  return 0;
}
extern "C" int32_t memopt_q8_matmul_a8_packed(void* const* p, const int64_t* s) {
  const int64_t o = s[3];
  memopt_q8_matmul_a8((const float*)p[0], (const int8_t*)p[1 + o], (const float*)p[2 + o],
                      o ? (const float*)p[1] : nullptr, (float*)p[3 + o], s[0], s[1], s[2], s[4]);
  return 0;
}
extern "C" int32_t memopt_q4_matmul_a8_packed(void* const* p, const int64_t* s) {
  const int64_t o = s[3];
  memopt_q4_matmul_a8((const float*)p[0], (const uint8_t*)p[1 + o], (const float*)p[2 + o],
                      o ? (const float*)p[1] : nullptr, (float*)p[3 + o], s[0], s[1], s[2], s[4]);
  return 0;
}
extern "C" int32_t memopt_bf16_matmul_packed(void* const* p, const int64_t* s) {
  const int64_t o = s[3];
  memopt_bf16_matmul((const float*)p[0], (const uint16_t*)p[1 + o],
                     o ? (const float*)p[1] : nullptr, (float*)p[2 + o], s[0], s[1], s[2]);
  return 0;
}
"""

_P = ctypes.c_void_p
_I = ctypes.c_int64
# entry point -> argument types (pointers first, then sizes)
SIGNATURES = {
    "memopt_q8_matmul": (_P, _P, _P, _P, _P, _I, _I, _I),
    "memopt_q4_matmul": (_P, _P, _P, _P, _P, _I, _I, _I, _I),
    "memopt_bf16_matmul": (_P, _P, _P, _P, _I, _I, _I),
    "memopt_f32_matmul": (_P, _P, _P, _P, _I, _I, _I),
    "memopt_f32_matmul_kn": (_P, _P, _P, _P, _I, _I, _I),
    "memopt_q8_rows": (_P, _P, _P, _I, _I, _I),
    "memopt_q4_rows": (_P, _P, _P, _I, _I, _I, _I),
    "memopt_bf16_rows": (_P, _P, _I, _I, _I),
    "memopt_gather_rows": (_I, _P, _P, _P, _P, _I, _I, _I, _I),
    "memopt_q8_matmul_a8": (_P, _P, _P, _P, _P, _I, _I, _I, _I),
    "memopt_q4_matmul_a8": (_P, _P, _P, _P, _P, _I, _I, _I, _I),
    "memopt_quantize_x": (_P, _P, _I, _I, _I),
    "memopt_quantize_rows": (_P, _P, _P, _I, _I),
    "memopt_quantize_blocks": (_P, _P, _P, _I, _I, _I),
    "memopt_q4_unpack_i8": (_P, _P, _I, _I, _I),
    "memopt_scale_group": (_P, _P, _P, _P, _P, _I, _I, _I, _I),
    "memopt_scale_int32": (_P, _P, _P, _P, _P, _I, _I),
}


@functools.cache
def packed_address(name: str) -> int:
    """The address of kernel `name`'s entry point for the native launcher (`<name>_packed`:
    `int32_t f(void* const* pointers, const int64_t* scalars)`)."""
    return build.entry_address(SOURCE, f"{name}_packed")


_RETURNS_CODE = {"memopt_gather_rows"}


@functools.cache
def functions() -> dict[str, ctypes._CFuncPtr]:
    """The kernels by name, built on first use (CompilerNotFound / CompileError if not)."""
    library, _ = build.library(SOURCE)
    found = {}
    for name, argtypes in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int32 if name in _RETURNS_CODE else None
        found[name] = function
    return found


# format -> (GEMV, GEMV with int8 activations, dequantized rows). Each takes the stored
# weight's pointers (data, and scale where the format has one) first; int4's take the group
# size as their last argument.
_KERNELS = {
    "int8": ("memopt_q8_matmul", "memopt_q8_matmul_a8", "memopt_q8_rows"),
    "int4": ("memopt_q4_matmul", "memopt_q4_matmul_a8", "memopt_q4_rows"),
    "bf16": ("memopt_bf16_matmul", None, "memopt_bf16_rows"),
}


def matmul(
    x: torch.Tensor,
    weight: QuantizedWeight,
    int8_activations: bool = False,
    bias: torch.Tensor | None = None,
    gemm: str = "aten",
) -> torch.Tensor:
    """`x @ W^T (+ bias)` for float32 x (M, K) on the CPU, W never written out as float32.

    int8_activations (int8 and int4 weights): x is quantized too, a block at a time (int4:
    the weight's groups; int8: `ACTIVATION_BLOCK` elements), and the dot products are
    integer. Many rows multiply the same quantized x in float32; many rows of int8 weights,
    where the processor has an integer GEMM, are one instead, x quantized a row at a time
    (`_integer_matmul`). A bias (N,) float32 is added as each output is stored. `gemm`: the
    library the dequantized tiles of many rows go to ("aten" or "onednn": the graph's
    `cpu_gemm` choice, runtime/gemm.py).
    """
    if x.dim() != 2 or x.shape[1] != weight.cols:
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({'x'.join(map(str, x.shape))} and "
            f"{weight.cols}x{weight.rows})"
        )
    x = x.resolve_neg().contiguous()  # a negated view's bit: the kernels read the memory
    if bias is not None:
        bias = bias.resolve_neg().contiguous()  # kept: the kernels read it after this line
    m, n, k = x.shape[0], weight.rows, weight.cols
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    kernels = functions()
    _, integer_gemv, dequantize_rows = _KERNELS[weight.kind]
    integer = int8_activations and integer_gemv is not None
    block = weight.group if weight.kind == "int4" else ACTIVATION_BLOCK
    stored = (weight.data.data_ptr(), *([] if weight.scale is None else [weight.scale.data_ptr()]))
    group = (weight.group,) if weight.kind == "int4" else ()
    if m <= GEMV_ROWS:
        bias_address = None if bias is None else bias.data_ptr()
        name, last = _gemv(weight, int8_activations)
        kernels[name](x.data_ptr(), *stored, bias_address, out.data_ptr(), m, n, k, *last)
        return out
    # K = 1: oneDNN misreads the (1, N) operand's strides (1, 1). `_int_mm` is oneDNN's:
    # disabled, it runs plain loops (100x slower).
    onednn = torch.backends.mkldnn.enabled
    if integer and weight.kind == "int8" and k > 1 and onednn and integer_gemm():
        return _integer_matmul(x, weight, bias, out)
    if integer and weight.kind == "int4" and onednn and integer_gemm():
        return _integer_matmul_groups(x, weight, bias, out)
    if integer:
        quantized_x = torch.empty_like(x)
        kernels["memopt_quantize_x"](x.data_ptr(), quantized_x.data_ptr(), m, k, block)
        x = quantized_x
    tile_rows = max(16, TILE_BYTES // (4 * k))
    tile = torch.empty((min(tile_rows, n), k), dtype=torch.float32, device=x.device)
    onednn = onednn and gemm == "onednn"
    # one tile: oneDNN's result is the output, not copied into it (the 4-layer Llama's int4
    # prefill of 1024 tokens: 76.7-79.6 -> 73.9-74.6 ms, separate processes, alternating)
    if onednn and n <= tile_rows:
        kernels[dequantize_rows](*stored, tile.data_ptr(), 0, n, k, *group)
        return onednn_addmm(bias, x, tile.t())
    for n0 in range(0, n, tile_rows):
        rows = min(tile_rows, n - n0)
        kernels[dequantize_rows](*stored, tile.data_ptr(), n0, rows, k, *group)
        columns = out[:, n0 : n0 + rows]
        part = None if bias is None else bias[n0 : n0 + rows]
        if onednn:  # no out= form: its result is copied into the columns
            columns.copy_(onednn_addmm(part, x, tile[:rows].t()))
        elif part is None:
            torch.mm(x, tile[:rows].t(), out=columns)
        else:
            torch.addmm(part, x, tile[:rows].t(), out=columns)
    return out


_GATHER_KINDS = {"int8": 0, "int4": 1, "bf16": 2}


def gather_rows(weight: QuantizedWeight, index: torch.Tensor) -> torch.Tensor | None:
    """Rows `index` of W as float32, shaped `index.shape + (K,)`, dequantized by one C call
    (`memopt_gather_rows`), or None where it does not take them (another format, device or
    index dtype, or an index outside [0, N): the caller gathers as torch does)."""
    kind = _GATHER_KINDS.get(weight.kind)
    if kind is None or index.dtype != torch.int64 or not (index.is_cpu and weight.data.is_cpu):
        return None
    flat = index.reshape(-1).contiguous()
    out = torch.empty((*index.shape, weight.cols), dtype=torch.float32, device="cpu")
    failed = functions()["memopt_gather_rows"](
        kind,
        weight.data.data_ptr(),
        None if weight.scale is None else weight.scale.data_ptr(),
        flat.data_ptr(),
        out.data_ptr(),
        flat.numel(),
        weight.rows,
        weight.cols,
        weight.group,
    )
    return None if failed else out


def bind_gather(
    weight: QuantizedWeight, index: torch.Tensor, wraps: bool = True
) -> tuple[object, tuple] | None:
    """A native launch of `gather_rows` for an index of this layout, or None (another
    format, dtype or device, a non-contiguous index, no launcher): (launch, output shape),
    called `launch(index, *stored, out)` with `stored` the weight's data (and scale) and out
    a fresh float32 tensor of that shape. It returns 1 without writing where an index is
    outside [-N, N) (`wraps`: a negative one counts from the end) or [0, N) (not `wraps`),
    `launcher.LAYOUT_MISMATCH` where the index's layout differs."""
    kind = _GATHER_KINDS.get(weight.kind)
    if kind is None or index.dtype != torch.int64 or not (index.is_cpu and weight.data.is_cpu):
        return None
    if not index.is_contiguous() or index.is_neg():
        return None
    scaled = int(weight.scale is not None)
    low = -weight.rows if wraps else 0
    scalars = (kind, index.numel(), weight.rows, weight.cols, weight.group, scaled, low)
    launch = launcher.bind_layouts(
        packed_address("memopt_gather_rows"), (index,), 2 + scaled, scalars
    )
    return None if launch is None else (launch, (*index.shape, weight.cols))


def bind_matmul(
    x: torch.Tensor,
    weight: QuantizedWeight,
    int8_activations: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[object, int, int] | None:
    """A native launch of `matmul`'s GEMV for operands of these layouts, or None (more than
    GEMV_ROWS rows, no launcher): (launch, M, N), called `launch(x[, bias], *stored, y)`
    with `stored` the weight's data (and scale), y a fresh (M, N) output. It checks x's and
    the bias's dtype, shape and strides (x contiguous, the bias a contiguous (N,) vector)
    and returns `launcher.LAYOUT_MISMATCH` without running where they differ."""
    if x.dim() != 2 or x.shape[1] != weight.cols:
        return None
    m, n, k = x.shape[0], weight.rows, weight.cols
    if not 1 <= m <= GEMV_ROWS or not x.is_contiguous() or x.is_neg():
        return None
    if bias is not None and (not bias.is_contiguous() or bias.is_neg()):
        return None
    name, last = _gemv(weight, int8_activations)
    operands = (x,) if bias is None else (x, bias)
    stored = 1 if weight.scale is None else 2
    scalars = (m, n, k, int(bias is not None), *last)
    launch = launcher.bind_layouts(packed_address(name), operands, stored + 1, scalars)
    return None if launch is None else (launch, m, n)


def _gemv(weight: QuantizedWeight, int8_activations: bool) -> tuple[str, tuple[int, ...]]:
    """The GEMV kernel for `weight` and its last arguments: the int8 activations' block
    (int4: the weight's group), or int4's group, or none."""
    gemv, integer_gemv, _ = _KERNELS[weight.kind]
    if int8_activations and integer_gemv is not None:
        return integer_gemv, (weight.group if weight.kind == "int4" else ACTIVATION_BLOCK,)
    return gemv, (weight.group,) if weight.kind == "int4" else ()


@functools.cache
def integer_gemm() -> bool:
    """Whether many rows of int8 x int8 run as one integer GEMM (`torch._int_mm`): where the
    processor has VNNI (int8 dot products summed in int32, 4x float32's multiply-adds an
    instruction; on the EPYC a 1024x1024 by 1024x2816 product took 3.9 ms against 13.9 ms for
    dequantized tiles on oneDNN) and torch's CPU build has the op."""
    flags = build.cpu_identity()
    if "avx512_vnni" not in flags and "avx_vnni" not in flags:
        return False
    try:
        a = torch.ones((32, 64), dtype=torch.int8, device="cpu")
        return bool(torch._int_mm(a, a.t())[0, 0] == 64)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# Many rows of int4 weights with int8 activations: a group's int32 products of this many
# bytes at most at a time (rows of x in chunks), so that they and the output's rows stay in
# cache while they are summed (`_integer_matmul_groups`).
GROUP_PRODUCTS_BYTES = 4 << 20


def _integer_matmul_groups(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Many rows, int4 weights and int8 activations (`matmul`): x quantized per group of the
    weight's, as the GEMV quantizes it; one integer GEMM a group over the nibbles unpacked
    to int8; each group's int32 products scaled by x's and W's group scales and added into
    the output (the bias first), a group and a chunk of rows at a time
    (`memopt_scale_group`)."""
    m, k = x.shape
    n, group = weight.rows, weight.group
    groups = -(-k // group)
    kernels = functions()
    quantized_x = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scales = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    kernels["memopt_quantize_blocks"](
        x.data_ptr(), quantized_x.data_ptr(), scales.data_ptr(), m, k, group
    )
    unpacked = torch.empty((n, k), dtype=torch.int8, device=x.device)
    kernels["memopt_q4_unpack_i8"](weight.data.data_ptr(), unpacked.data_ptr(), n, k, group)
    weight_scales = weight.scale.t().contiguous()  # (groups, N)
    bias_address = None if bias is None else bias.data_ptr()  # contiguous: `matmul`
    rows = max(1, GROUP_PRODUCTS_BYTES // (4 * n))
    products = torch.empty((min(rows, m), n), dtype=torch.int32, device=x.device)
    for m0 in range(0, m, rows):
        chunk = min(rows, m - m0)
        part = products[:chunk]
        for g in range(groups):
            columns = slice(g * group, min(k, (g + 1) * group))
            torch._int_mm(quantized_x[m0 : m0 + chunk, columns], unpacked[:, columns].t(), out=part)
            kernels["memopt_scale_group"](
                part.data_ptr(), scales[m0].data_ptr(), weight_scales[g].data_ptr(), bias_address,
                out[m0].data_ptr(), chunk, n, groups, g,
            )  # fmt: skip
    return out


def _integer_matmul(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Many rows, int8 weights and int8 activations (`matmul`): x quantized a row at a time
    (one scale a row: coarser than the GEMV's blocks of ACTIVATION_BLOCK), one integer GEMM
    against the stored weight, its int32 result scaled (and the bias added) into `out`."""
    m, k = x.shape
    kernels = functions()
    quantized_x = torch.empty((m, k), dtype=torch.int8, device=x.device)
    row_scales = torch.empty(m, dtype=torch.float32, device=x.device)
    kernels["memopt_quantize_rows"](
        x.data_ptr(), quantized_x.data_ptr(), row_scales.data_ptr(), m, k
    )
    products = torch._int_mm(quantized_x, weight.data.t())
    bias_address = None if bias is None else bias.data_ptr()  # contiguous: `matmul`
    kernels["memopt_scale_int32"](
        products.data_ptr(), row_scales.data_ptr(), weight.scale.data_ptr(), bias_address,
        out.data_ptr(), m, weight.rows,
    )  # fmt: skip
    return out
