"""Attention of one query position over a key/value cache, for the CPU (a decode step's).

A decode step attends one new query row per head to every cached key and value: each cached
element is read once and used once (twice over for the G query heads of a grouped-query
model, from L1), so the op's time is the cache's bytes over the bandwidth it streams at.
`memopt_decode_attention` computes

    out[b, h] = softmax(q[b, h] . k[b, h // G, l] * scale + mask[b, h, l])_l  @  v[b, h // G]

for float32 q (B, H, 1, D), k (B, H / G, L, D), v (B, H / G, L, Dv) and an optional float32
additive mask broadcast to (B, H, 1, L), with the logsumexp of each row's scores. The last
dimension of q, k and v must be contiguous; the other strides are free (a static cache's
slices and its full allocation alike).

- Work: units of (batch, key/value head, `chunk` positions), spread over the OpenMP
  threads; a unit computes its G query heads together, so a key row is read from memory
  once for all of them. A unit writes its max score, its sum of exp(score - max) and its
  sum of exp(score - max) * v per head; the calling thread combines the units of a head
  (split-K "flash decoding": out = sum_u e^(m_u - m) acc_u / sum_u e^(m_u - m) s_u).
- Scores: 16 keys at a time. With AVX-512 and a head dim of 64 or 128 each key's products
  are summed lane-wise into one register and the 16 registers are reduced together into
  one vector of 16 scores (a transpose by unpacks and 128-bit shuffles: 45 instructions
  for 16 keys, against about 8 for each key's own horizontal sum); elsewhere a vectorized
  dot product per key.
- Softmax: two passes over the unit's scores (max, then exp and sum) in a buffer; exp is
  the prelude's `mo_expf` (<= 1 ulp, inlined and vectorized).
- Values: a block of rows at a time, each head's sum kept in registers for a fixed head
  dim; a row whose weight is 0 (masked, or under float32's range) is not read.
- A block of 16 positions the mask drops for a head (-inf: a static cache's unused tail)
  reads neither its keys nor its values. A fully masked row gives zeros and a logsumexp
  of 0, as ATen's CPU flash attention does.
- Rows ahead are prefetched in software (24 rows: 6 KiB of keys or values at D = 64), which
  keeps each core's loads in flight while it sums.
- `memopt_decode_attention_append` attends over a cache appended in the same call, as a
  dynamic cache's decode step does (`cat([k_old, k_new], -2)`, and the same for values): a
  work unit first copies its rows into the concatenations it writes, then attends over
  them from its own core's caches (a unit's 64 KiB of keys and of values at D = 64). A unit
  of old rows only writes its copies with non-temporal stores (where AVX-512 and 64-byte
  rows allow), which need no read of the lines they write, and attends over the old rows
  it has just read; the unit holding the new positions reads back its copy. The old cache
  is read from memory once, where a concatenation and then the attention read it twice.

The result differs from ATen's in summation order and exp's rounding (float32 rounding,
not bit for bit). Where ATen multiplies a masked position's value by 0, this kernel does
not read it: a non-finite value there makes ATen's row NaN and leaves this one finite.
"""

from __future__ import annotations

import ctypes
import functools

from memopt.backends.cpp import build
from memopt.backends.cpp.prelude import PRELUDE

# Key positions a work unit takes (module doc): 64 KiB of keys at D = 64.
CHUNK = 256

SOURCE = (
    PRELUDE
    + r"""
// memopt's decode attention (memopt/backends/cpp/attention.py).
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MO_KEYS 16  // keys a block: one vector of scores

// The larger of m and x, NaN if x is NaN (then stays NaN: NaN > m and x > NaN are false),
// so that a NaN score reaches the row's output as in ATen's op.
static inline float mo_max_nan(float m, float x) { return (x > m || x != x) ? x : m; }

#ifdef __AVX512F__
// Lane sums of 16 vectors, as one vector: r[j] = sum of v[j]'s lanes.
static inline __m512 mo_sum16(__m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // u[i]'s 128-bit lane L holds keys 4i..4i+3's sums over lane L's elements.
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                   _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                                   _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// Scores of 16 keys (rows of k, `ks` apart) against q: D a multiple of 16.
template <int D>
static inline __m512 mo_scores16(const float* __restrict q, const float* __restrict k, int64_t ks) {
  __m512 qv[D / 16], acc[16];
  for (int c = 0; c < D / 16; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int j = 0; j < 16; ++j) {
    const float* kj = k + j * ks;
    __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj));
    for (int c = 1; c < D / 16; ++c) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kj + 16 * c), a);
    acc[j] = a;
  }
  return mo_sum16(acc);
}
#endif

// One work unit: G query heads sharing one key/value head, over keys [l0, l1).
// Writes the unit's max score, its sum of exp(score - max) and sum of exp(...) * v.
template <int DC>
static void mo_decode_unit(
    const float* __restrict q, const float* __restrict k, const float* __restrict v,
    const float* __restrict mask, int64_t G, int64_t D_, int64_t Dv_, int64_t qs_h,
    int64_t ks_l, int64_t vs_l, int64_t ms_h, int64_t ms_l, int64_t l0, int64_t l1,
    float scale, float* __restrict sc, float* __restrict m_out, float* __restrict s_out,
    float* __restrict acc) {
  const int64_t D = DC ? DC : D_, Dv = DC ? DC : Dv_;
  const int64_t n = l1 - l0;
  const int64_t ahead = 24;  // rows prefetched ahead (module doc)
  for (int64_t g = 0; g < G; ++g) m_out[g] = -INFINITY;
  for (int64_t j0 = 0; j0 < n; j0 += MO_KEYS) {
    const int64_t jn = j0 + MO_KEYS < n ? MO_KEYS : n - j0;
    for (int64_t j = 0; j < jn; ++j)
      if (j0 + j + ahead < n)
        for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(k + (l0 + j0 + j + ahead) * ks_l + c);
    const float* kb = k + (l0 + j0) * ks_l;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * qs_h;
      const float* mg = mask ? mask + g * ms_h + (l0 + j0) * ms_l : nullptr;
      float* s = sc + g * n + j0;
      if (mg) {  // a block the mask drops for this head: its keys are not read
        bool dropped = true;
        for (int64_t j = 0; j < jn; ++j) dropped = dropped && mg[j * ms_l] == -INFINITY;
        if (dropped) {
          for (int64_t j = 0; j < jn; ++j) s[j] = -INFINITY;
          continue;
        }
      }
#ifdef __AVX512F__
      if (DC && jn == MO_KEYS) {
        __m512 r = _mm512_mul_ps(mo_scores16<DC>(qg, kb, ks_l), _mm512_set1_ps(scale));
        _mm512_storeu_ps(s, r);
        if (mg)
          for (int64_t j = 0; j < MO_KEYS; ++j) s[j] += mg[j * ms_l];
      } else
#endif
      {
        for (int64_t j = 0; j < jn; ++j) {
          const float* kj = kb + j * ks_l;
          float d = 0.0f;
          #pragma omp simd reduction(+ : d)
          for (int64_t c = 0; c < D; ++c) d += qg[c] * kj[c];
          s[j] = d * scale + (mg ? mg[j * ms_l] : 0.0f);
        }
      }
      float m = m_out[g];
      for (int64_t j = 0; j < jn; ++j) m = mo_max_nan(m, s[j]);
      m_out[g] = m;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float m = m_out[g] == -INFINITY ? 0.0f : m_out[g];
    float total = 0.0f;
    float* row = sc + g * n;
    #pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      const float p = mo_expf(row[j] - m);
      row[j] = p;
      total += p;
    }
    s_out[g] = total;
  }
  // Weighted values: a block of rows at a time, every head's sum kept in registers.
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < Dv; ++c) acc[g * Dv + c] = 0.0f;
  for (int64_t j0 = 0; j0 < n; j0 += MO_KEYS) {
    const int64_t jn = j0 + MO_KEYS < n ? MO_KEYS : n - j0;
    for (int64_t j = 0; j < jn; ++j)
      if (j0 + j + ahead < n)
        for (int64_t c = 0; c < Dv; c += 16) __builtin_prefetch(v + (l0 + j0 + j + ahead) * vs_l + c);
    for (int64_t g = 0; g < G; ++g) {
      const float* p = sc + g * n + j0;
      float a[DC ? DC : 1];
      float* out = acc + g * Dv;
      if (DC) {
        for (int64_t c = 0; c < Dv; ++c) a[c] = out[c];
        for (int64_t j = 0; j < jn; ++j) {
          if (p[j] == 0.0f) continue;  // masked (or underflowed): nothing to add
          const float* vj = v + (l0 + j0 + j) * vs_l;
          #pragma omp simd
          for (int64_t c = 0; c < Dv; ++c) a[c] += p[j] * vj[c];
        }
        for (int64_t c = 0; c < Dv; ++c) out[c] = a[c];
      } else {
        for (int64_t j = 0; j < jn; ++j) {
          if (p[j] == 0.0f) continue;
          const float* vj = v + (l0 + j0 + j) * vs_l;
          #pragma omp simd
          for (int64_t c = 0; c < Dv; ++c) out[c] += p[j] * vj[c];
        }
      }
    }
  }
}

// A cache appended in the same call (memopt_decode_attention_append): the keys and values
// of positions below `old_len` come from k_old / v_old, the others from k_new / v_new,
// each with its (batch, head, position) strides; they are copied into k and v as read.
struct MoAppend {
  const float *k_old, *k_new, *v_old, *v_new;
  int64_t old_len;
  const int64_t* strides;  // k_old, k_new, v_old, v_new: b, h, l each
};

// Rows [l0, l1) of one head's keys or values into dst (rows ds_l apart): from old below
// old_len, from fresh from there on. `stream`: with non-temporal stores where aligned (the
// unit then reads the old rows, not dst: a store that bypasses the caches needs no read of
// the line it writes, which an ordinary store makes).
static inline void mo_append_rows(float* __restrict dst, int64_t ds_l,
                                  const float* __restrict old, int64_t os_l,
                                  const float* __restrict fresh, int64_t ns_l,
                                  int64_t old_len, int64_t l0, int64_t l1, int64_t d,
                                  bool stream) {
#ifdef __AVX512F__
  if (stream && d % 16 == 0 && ds_l % 16 == 0 && ((uintptr_t)dst & 63) == 0) {
    for (int64_t l = l0; l < l1; ++l) {
      const float* src = l < old_len ? old + l * os_l : fresh + (l - old_len) * ns_l;
      for (int64_t c = 0; c < d; c += 16)
        _mm512_stream_ps(dst + l * ds_l + c, _mm512_loadu_ps(src + c));
    }
    _mm_sfence();
    return;
  }
#endif
  (void)stream;
  for (int64_t l = l0; l < l1; ++l) {
    const float* src = l < old_len ? old + l * os_l : fresh + (l - old_len) * ns_l;
    __builtin_memcpy(dst + l * ds_l, src, sizeof(float) * d);
  }
}

// Returns 0, or 1 when its scratch could not be allocated (nothing written).
static int32_t mo_decode_attention(
    const float* q, const float* k, const float* v, const float* mask, float* out,
    float* lse, const int64_t* sizes, const int64_t* strides, float scale, int64_t chunk,
    const MoAppend* append) {
  const int64_t B = sizes[0], H = sizes[1], Hkv = sizes[2], L = sizes[3], D = sizes[4],
                Dv = sizes[5];
  const int64_t qs_b = strides[0], qs_h = strides[1], ks_b = strides[2], ks_h = strides[3],
                ks_l = strides[4], vs_b = strides[5], vs_h = strides[6], vs_l = strides[7],
                ms_b = strides[8], ms_h = strides[9], ms_l = strides[10];
  const int64_t G = H / Hkv, chunks = (L + chunk - 1) / chunk, units = B * Hkv * chunks;
  // Scratch kept between calls (a thread's own, grown as needed): its pages stay mapped
  // and warm, where a fresh allocation each step would fault them in again.
  // Freed when the thread exits.
  struct Scratch {
    float* data = nullptr;
    size_t floats = 0;
    ~Scratch() { free(data); }
  };
  static thread_local Scratch scratch;
  const size_t floats = (size_t)(units * G * (chunk + 2 + Dv));
  if (floats > scratch.floats) {
    free(scratch.data);
    scratch.data = (float*)malloc(sizeof(float) * floats);
    scratch.floats = scratch.data ? floats : 0;
    if (!scratch.data) return 1;
  }
  float* sc = scratch.data;
  float* m_part = sc + units * G * chunk;
  float* s_part = m_part + units * G;
  float* acc_part = s_part + units * G;
  const int fixed = (D == 64 && Dv == 64) ? 64 : (D == 128 && Dv == 128) ? 128 : 0;
  #pragma omp parallel for schedule(static) if (units > 1 && B * H * L * D >= 16384)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t c = u % chunks, bh = u / chunks, b = bh / Hkv, h = bh % Hkv;
    const int64_t l0 = c * chunk, l1 = l0 + chunk < L ? l0 + chunk : L;
    const float* mu = mask ? mask + b * ms_b + h * G * ms_h : nullptr;
    const float* qu = q + b * qs_b + h * G * qs_h;
    const float *ku = k + b * ks_b + h * ks_h, *vu = v + b * vs_b + h * vs_h;
    int64_t uk_l = ks_l, uv_l = vs_l;
    if (append) {
      // This unit's rows of the appended cache, written before it reads them; a unit of old
      // rows only streams its copies out and reads the old rows (from its caches, just read)
      const int64_t* as = append->strides;
      const float *ko = append->k_old + b * as[0] + h * as[1],
                  *vo = append->v_old + b * as[6] + h * as[7];
      const bool old_only = l1 <= append->old_len;
      mo_append_rows((float*)ku, ks_l, ko, as[2], append->k_new + b * as[3] + h * as[4], as[5],
                     append->old_len, l0, l1, D, old_only);
      mo_append_rows((float*)vu, vs_l, vo, as[8], append->v_new + b * as[9] + h * as[10], as[11],
                     append->old_len, l0, l1, Dv, old_only);
      if (old_only) ku = ko, vu = vo, uk_l = as[2], uv_l = as[8];
    }
    float *scu = sc + u * G * chunk, *mu_ = m_part + u * G, *su = s_part + u * G,
          *au = acc_part + u * G * Dv;
    if (fixed == 64)
      mo_decode_unit<64>(qu, ku, vu, mu, G, D, Dv, qs_h, uk_l, uv_l, ms_h, ms_l, l0, l1, scale, scu, mu_, su, au);
    else if (fixed == 128)
      mo_decode_unit<128>(qu, ku, vu, mu, G, D, Dv, qs_h, uk_l, uv_l, ms_h, ms_l, l0, l1, scale, scu, mu_, su, au);
    else
      mo_decode_unit<0>(qu, ku, vu, mu, G, D, Dv, qs_h, uk_l, uv_l, ms_h, ms_l, l0, l1, scale, scu, mu_, su, au);
  }
  for (int64_t bh = 0; bh < B * Hkv; ++bh)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t base = bh * chunks;
      float m = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) m = mo_max_nan(m, m_part[(base + c) * G + g]);
      float* o = out + (bh * G + g) * Dv;
      for (int64_t e = 0; e < Dv; ++e) o[e] = 0.0f;
      float total = 0.0f;
      if (m != -INFINITY) {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t u = base + c;
          const float mc = m_part[u * G + g];
          if (mc == -INFINITY) continue;
          const float w = mo_expf(mc - m);
          total += w * s_part[u * G + g];
          const float* a = acc_part + (u * G + g) * Dv;
          for (int64_t e = 0; e < Dv; ++e) o[e] += w * a[e];
        }
        const float inv = 1.0f / total;
        for (int64_t e = 0; e < Dv; ++e) o[e] *= inv;
      }
      lse[bh * G + g] = m == -INFINITY ? 0.0f : m + __builtin_logf(total);
    }
  return 0;
}

extern "C" int32_t memopt_decode_attention(
    const float* q, const float* k, const float* v, const float* mask, float* out,
    float* lse, const int64_t* sizes, const int64_t* strides, float scale, int64_t chunk) {
  return mo_decode_attention(q, k, v, mask, out, lse, sizes, strides, scale, chunk, nullptr);
}

// The attention over a cache appended in the call: k and v (the concatenations, written
// here) as in memopt_decode_attention; sizes[6]: the old cache's length; the strides after
// the eleven: k_old, k_new, v_old, v_new (b, h, l each).
extern "C" int32_t memopt_decode_attention_append(
    const float* q, const float* k_old, const float* k_new, const float* v_old,
    const float* v_new, const float* mask, float* out, float* lse, float* k, float* v,
    const int64_t* sizes, const int64_t* strides, float scale, int64_t chunk) {
  const MoAppend append = {k_old, k_new, v_old, v_new, sizes[6], strides + 11};
  return mo_decode_attention(q, k, v, mask, out, lse, sizes, strides, scale, chunk, &append);
}

// The native launcher's entry (cpp/launcher.py): p = q, k, v[, mask], out, lse; s = the six
// sizes, the eleven strides, the scale's float bits, the chunk, whether a mask is given.
extern "C" int32_t memopt_decode_attention_packed(void* const* p, const int64_t* s) {
  const int64_t m = s[19];
  const uint32_t bits = static_cast<uint32_t>(s[17]);
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return memopt_decode_attention((const float*)p[0], (const float*)p[1], (const float*)p[2],
                                 m ? (const float*)p[3] : nullptr, (float*)p[3 + m],
                                 (float*)p[4 + m], s, s + 6, scale, s[18]);
}
"""
)

_P = ctypes.c_void_p
SIGNATURE = (_P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_int64)


@functools.cache
def function() -> ctypes._CFuncPtr:
    """`memopt_decode_attention`, built on first use (CompilerNotFound / CompileError if
    not). Arguments: q, k, v, mask (or None), out, lse, sizes (B, H, H_kv, L, D, Dv),
    strides (q: b, h; k: b, h, l; v: b, h, l; mask: b, h, l), scale, chunk. Returns 0, or
    1 where its scratch memory could not be allocated."""
    return build.entry_point(SOURCE, "memopt_decode_attention", SIGNATURE, ctypes.c_int32)


APPEND_SIGNATURE = (_P,) * 12 + (ctypes.c_float, ctypes.c_int64)


@functools.cache
def append_function() -> ctypes._CFuncPtr:
    """`memopt_decode_attention_append`, built on first use: the attention over a cache
    appended in the same call (runtime/decode_attention.py `AppendAttention`). Arguments:
    q, k_old, k_new, v_old, v_new, mask (or None), out, lse, k, v (the concatenations it
    writes), sizes (B, H, H_kv, L, D, Dv, the old length), strides (the eleven of
    `function`, of k and v, then k_old, k_new, v_old, v_new: b, h, l each), scale, chunk."""
    return build.entry_point(
        SOURCE, "memopt_decode_attention_append", APPEND_SIGNATURE, ctypes.c_int32
    )


@functools.cache
def packed_address() -> int:
    """The address of `memopt_decode_attention_packed`, the entry for the native launcher:
    `int32_t f(void* const* pointers, const int64_t* scalars)` (the source's comment)."""
    return build.entry_address(SOURCE, "memopt_decode_attention_packed")
