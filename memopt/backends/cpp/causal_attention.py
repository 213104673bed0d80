"""Causal attention of many query positions, for the CPU (a prefill's).

A prefill attends every prompt position to the positions before it: half of the
query-by-key products are masked, and the arithmetic, not the memory, sets the op's time
(a 1024-token prefill of the decode benchmark's Llama: 1.07 GFLOP a layer over 0.5 MB of
keys and values). `memopt_causal_attention` computes, for float32 q (B, H, L, D),
k (B, H / G, S, D) and v (B, H / G, S, D),

    out[b, h, i] = softmax(q[b, h, i] . k[b, h // G, j] * scale, over j <= i)  @  v[b, h // G]

(the top-left causal mask of ATen's `is_causal`: query i sees keys 0..i whatever S is), with
the logsumexp of each row's scores. The last dimension of q, k and v must be contiguous;
the other strides are free.

- Work: units of (batch, key/value head, `MO_QB` = 64 query rows of each of the G query
  heads sharing it), handed to the OpenMP threads one at a time, longest first (a later
  unit has more keys to read: a static split would leave a thread idle). 64 rows rather
  than 32: 5.6 -> 5.1 ms for 8 heads of their own at 1024 positions, the same elsewhere.
- A unit walks its keys in tiles of `MO_KB` = 64, stopping at its last row's position: the
  tiles the mask drops whole are never computed. It keeps each row's running max, sum of
  exp(score - max) and weighted values (the online softmax of flash attention), rescaled by
  exp(old max - new max) when a tile raises the max.
- Scores: a key tile is transposed into a (D, MO_KB) block once for the G heads, then with
  AVX-512 and a head dim of 64 or 128 four query rows times the tile's 64 keys are sixteen
  vector sums, each a broadcast query element times a row of the block; elsewhere plain
  loops the compiler vectorizes. Values: each row's sum of p * v in registers over the tile's keys.
- exp is the prelude's `mo_expf` (<= 1 ulp, vectorized).

The result differs from ATen's in summation order and exp's rounding (float32 rounding, not
bit for bit). A NaN score makes its row NaN, as in ATen's op.
"""

from __future__ import annotations

import ctypes
import functools

from memopt.backends.cpp import build
from memopt.backends.cpp.prelude import PRELUDE

SOURCE = (
    PRELUDE
    + r"""
// memopt's causal attention (memopt/backends/cpp/causal_attention.py).
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MO_QB 64  // query rows a unit
#define MO_KB 64  // keys a tile

// s[r * MO_KB + j] = (q row r . key j) * scale for r < rows and every j of the tile; kt is
// the tile transposed (kt[d * MO_KB + j]), zeros past its last key.
template <int DC>
static void mo_tile_scores(const float* __restrict q, int64_t qs_l, const float* __restrict kt,
                           int64_t D_, int64_t rows, float scale, float* __restrict s) {
  const int64_t D = DC ? DC : D_;
  int64_t r = 0;
#ifdef __AVX512F__
  if (DC) {
    const __m512 sv = _mm512_set1_ps(scale);
    for (; r + 4 <= rows; r += 4) {
      __m512 acc[4][4];
      for (int a = 0; a < 4; ++a)
        for (int c = 0; c < 4; ++c) acc[a][c] = _mm512_setzero_ps();
      const float* q0 = q + r * qs_l;
      for (int64_t d = 0; d < D; ++d) {
        const float* kd = kt + d * MO_KB;
        const __m512 k0 = _mm512_load_ps(kd), k1 = _mm512_load_ps(kd + 16),
                     k2 = _mm512_load_ps(kd + 32), k3 = _mm512_load_ps(kd + 48);
        for (int a = 0; a < 4; ++a) {
          const __m512 qa = _mm512_set1_ps(q0[a * qs_l + d]);
          acc[a][0] = _mm512_fmadd_ps(qa, k0, acc[a][0]);
          acc[a][1] = _mm512_fmadd_ps(qa, k1, acc[a][1]);
          acc[a][2] = _mm512_fmadd_ps(qa, k2, acc[a][2]);
          acc[a][3] = _mm512_fmadd_ps(qa, k3, acc[a][3]);
        }
      }
      for (int a = 0; a < 4; ++a)
        for (int c = 0; c < 4; ++c)
          _mm512_store_ps(s + (r + a) * MO_KB + 16 * c, _mm512_mul_ps(acc[a][c], sv));
    }
  }
#endif
  for (; r < rows; ++r) {
    float acc[MO_KB];
    for (int j = 0; j < MO_KB; ++j) acc[j] = 0.0f;
    const float* qr = q + r * qs_l;
    for (int64_t d = 0; d < D; ++d) {
      const float qd = qr[d];
      const float* kd = kt + d * MO_KB;
      #pragma omp simd
      for (int j = 0; j < MO_KB; ++j) acc[j] += qd * kd[j];
    }
    for (int j = 0; j < MO_KB; ++j) s[r * MO_KB + j] = acc[j] * scale;
  }
}

// o[r * Dv + c] += sum over the tile's n keys of p[r * MO_KB + j] * v[j][c], r < rows.
template <int DC>
static void mo_tile_values(const float* __restrict p, const float* __restrict v, int64_t vs_l,
                           int64_t Dv_, int64_t rows, int64_t n, float* __restrict o) {
  const int64_t Dv = DC ? DC : Dv_;
  int64_t r = 0;
#ifdef __AVX512F__
  if (DC) {
    constexpr int RB = DC == 64 ? 4 : 2, NV = DC / 16;  // sixteen vector sums
    for (; r + RB <= rows; r += RB) {
      __m512 acc[RB][NV];
      for (int a = 0; a < RB; ++a)
        for (int c = 0; c < NV; ++c) acc[a][c] = _mm512_loadu_ps(o + (r + a) * Dv + 16 * c);
      for (int64_t j = 0; j < n; ++j) {
        const float* vj = v + j * vs_l;
        __m512 vv[NV];
        for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(vj + 16 * c);
        for (int a = 0; a < RB; ++a) {
          const __m512 pa = _mm512_set1_ps(p[(r + a) * MO_KB + j]);
          for (int c = 0; c < NV; ++c) acc[a][c] = _mm512_fmadd_ps(pa, vv[c], acc[a][c]);
        }
      }
      for (int a = 0; a < RB; ++a)
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + (r + a) * Dv + 16 * c, acc[a][c]);
    }
  }
#endif
  for (; r < rows; ++r) {
    float* orow = o + r * Dv;
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[r * MO_KB + j];
      const float* vj = v + j * vs_l;
      #pragma omp simd
      for (int64_t c = 0; c < Dv; ++c) orow[c] += pj * vj[c];
    }
  }
}

// One unit: query rows [i0, i1) of the G heads sharing a key/value head (G * qs_h apart),
// against keys [0, min(i1, S)). A key tile is transposed once for the G heads.
template <int DC>
static void mo_causal_unit(const float* __restrict q, const float* __restrict k,
                           const float* __restrict v, float* __restrict out,
                           float* __restrict lse, int64_t G, int64_t qs_h, int64_t qs_l,
                           int64_t ks_l, int64_t vs_l, int64_t os_h, int64_t os_l,
                           int64_t ls_h, int64_t ls_l, int64_t S, int64_t D_, int64_t Dv_,
                           int64_t i0, int64_t i1, float scale, float* __restrict kt,
                           float* __restrict s, float* __restrict o, float* __restrict m,
                           float* __restrict l) {
  const int64_t D = DC ? DC : D_, Dv = DC ? DC : Dv_;
  const int64_t rows = i1 - i0, keys = i1 < S ? i1 : S;
  for (int64_t r = 0; r < G * MO_QB; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  for (int64_t e = 0; e < G * MO_QB * Dv; ++e) o[e] = 0.0f;
  for (int64_t j0 = 0; j0 < keys; j0 += MO_KB) {
    const int64_t n = j0 + MO_KB < keys ? MO_KB : keys - j0;
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = k + (j0 + j) * ks_l;
      for (int64_t d = 0; d < D; ++d) kt[d * MO_KB + j] = kj[d];
    }
    for (int64_t j = n; j < MO_KB; ++j)
      for (int64_t d = 0; d < D; ++d) kt[d * MO_KB + j] = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      float *mg = m + g * MO_QB, *lg = l + g * MO_QB, *og = o + g * MO_QB * Dv;
      mo_tile_scores<DC>(q + g * qs_h + i0 * qs_l, qs_l, kt, D, rows, scale, s);
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s + r * MO_KB;
        // the keys of the tile this row sees: up to its own position (the causal mask)
        const int64_t last = i0 + r - j0 + 1;
        const int64_t seen = last < n ? last : n;
        // A NaN score is left out of the max but makes its exp, so the row, NaN.
        float tile_max = -INFINITY;
        #pragma omp simd reduction(max : tile_max)
        for (int64_t j = 0; j < MO_KB; ++j) tile_max = j < seen && sr[j] > tile_max ? sr[j] : tile_max;
        const float m_new = tile_max > mg[r] ? tile_max : mg[r];
        float total = 0.0f;
        #pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < MO_KB; ++j) {
          const float e = j < seen ? mo_expf(sr[j] - m_new) : 0.0f;
          sr[j] = e;
          total += e;
        }
        if (m_new != mg[r]) {  // rescale the sums so far (exp(-inf) = 0 before any key)
          const float alpha = mo_expf(mg[r] - m_new);
          lg[r] *= alpha;
          float* orow = og + r * Dv;
          #pragma omp simd
          for (int64_t c = 0; c < Dv; ++c) orow[c] *= alpha;
          mg[r] = m_new;
        }
        lg[r] += total;
      }
      mo_tile_values<DC>(s, v + j0 * vs_l, vs_l, Dv, rows, n, og);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = 1.0f / l[g * MO_QB + r];
      float* orow = out + g * os_h + (i0 + r) * os_l;
      const float* src = o + (g * MO_QB + r) * Dv;
      for (int64_t c = 0; c < Dv; ++c) orow[c] = src[c] * inv;
      // a +inf score: ATen's logsumexp is +inf (and the row NaN, as here)
      const float mr = m[g * MO_QB + r];
      lse[g * ls_h + (i0 + r) * ls_l] = mr == INFINITY ? INFINITY : mr + __builtin_logf(l[g * MO_QB + r]);
    }
}

// sizes: B, H, H_kv, L, S, D, Dv; strides: q (b, h, l), k (b, h, l), v (b, h, l),
// out (b, h, l), lse (b, h, l). Returns 0, or 1 when a thread's tiles could not be allocated
// (the output is then incomplete).
extern "C" int32_t memopt_causal_attention(const float* q, const float* k, const float* v,
                                        float* out, float* lse, const int64_t* sizes,
                                        const int64_t* st, float scale) {
  const int64_t B = sizes[0], H = sizes[1], Hkv = sizes[2], L = sizes[3], S = sizes[4],
                D = sizes[5], Dv = sizes[6];
  const int64_t G = H / Hkv, blocks = (L + MO_QB - 1) / MO_QB, units = B * Hkv * blocks;
  const int fixed = (D == 64 && Dv == 64) ? 64 : (D == 128 && Dv == 128) ? 128 : 0;
  int32_t failed = 0;
  #pragma omp parallel
  {
    // a thread's tiles: a transposed key tile, a tile of scores, the rows' weighted values,
    // running max and sum (each size a multiple of 64 bytes, as aligned_alloc requires:
    // MO_KB and MO_QB are 64)
    float* kt = (float*)aligned_alloc(64, sizeof(float) * MO_KB * D);
    float* s = (float*)aligned_alloc(64, sizeof(float) * MO_KB * MO_QB);
    float* o = (float*)aligned_alloc(64, sizeof(float) * G * MO_QB * (Dv + 2));
    if (!kt || !s || !o) {
      #pragma omp atomic write
      failed = 1;
    }
    #pragma omp for schedule(dynamic, 1)
    for (int64_t u = units - 1; u >= 0; --u) {  // the longest units first
      if (!kt || !s || !o) continue;
      const int64_t blk = u % blocks, bh = u / blocks, b = bh / Hkv, h = bh % Hkv;
      const int64_t i0 = blk * MO_QB, i1 = i0 + MO_QB < L ? i0 + MO_QB : L;
      const float* qu = q + b * st[0] + h * G * st[1];
      const float* ku = k + b * st[3] + h * st[4];
      const float* vu = v + b * st[6] + h * st[7];
      float* ou = out + b * st[9] + h * G * st[10];
      float* lu = lse + b * st[12] + h * G * st[13];
      float *m = o + G * MO_QB * Dv, *l = m + G * MO_QB;
      if (fixed == 64)
        mo_causal_unit<64>(qu, ku, vu, ou, lu, G, st[1], st[2], st[5], st[8], st[10], st[11], st[13], st[14], S, D, Dv, i0, i1, scale, kt, s, o, m, l);
      else if (fixed == 128)
        mo_causal_unit<128>(qu, ku, vu, ou, lu, G, st[1], st[2], st[5], st[8], st[10], st[11], st[13], st[14], S, D, Dv, i0, i1, scale, kt, s, o, m, l);
      else
        mo_causal_unit<0>(qu, ku, vu, ou, lu, G, st[1], st[2], st[5], st[8], st[10], st[11], st[13], st[14], S, D, Dv, i0, i1, scale, kt, s, o, m, l);
    }
    free(kt);
    free(s);
    free(o);
  }
  return failed;
}

// The native launcher's entry (cpp/launcher.py): p = q, k, v, out, lse; s = the seven
// sizes, the fifteen strides, the scale's float bits.
extern "C" int32_t memopt_causal_attention_packed(void* const* p, const int64_t* s) {
  const uint32_t bits = static_cast<uint32_t>(s[22]);
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return memopt_causal_attention((const float*)p[0], (const float*)p[1], (const float*)p[2],
                                 (float*)p[3], (float*)p[4], s, s + 7, scale);
}
"""
)

_P = ctypes.c_void_p
SIGNATURE = (_P, _P, _P, _P, _P, _P, _P, ctypes.c_float)


@functools.cache
def function() -> ctypes._CFuncPtr:
    """`memopt_causal_attention`, built on first use (CompilerNotFound / CompileError if
    not). Arguments: q, k, v, out, lse, sizes (B, H, H_kv, L, S, D, Dv), strides (q, k, v,
    out, lse: b, h, l each), scale. Returns 0, or 1 where a thread's tiles could not be
    allocated."""
    return build.entry_point(SOURCE, "memopt_causal_attention", SIGNATURE, ctypes.c_int32)


@functools.cache
def packed_address() -> int:
    """The address of `memopt_causal_attention_packed`, the entry for the native launcher:
    `int32_t f(void* const* pointers, const int64_t* scalars)` (the source's comment)."""
    return build.entry_address(SOURCE, "memopt_causal_attention_packed")
