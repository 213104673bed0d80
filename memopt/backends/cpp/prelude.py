"""The C++ runtime every generated kernel starts with: types, conversions, op helpers.

Inlined into each kernel's source (not #included), so a source file is the whole program
and its hash is the whole cache key. The helpers follow ATen's CPU kernels, which the
reference backend inherits: `mo_floordiv` is `c10::div_floor_floating`, `mo_remainder` is
ATen's remainder kernel, `mo_pow` on integers is ATen's `powi`, and so on.

Every helper is a small inline function of scalars, so that GCC inlines it into the loop
and vectorizes the loop; type-dependent behaviour (integer vs floating) is resolved at
compile time with `if constexpr`.
"""

from __future__ import annotations

# libm functions the helpers call. Declared here rather than through <cmath>: parsing
# <cmath> takes 0.17 s, more than compiling a kernel. glibc's libmvec has SIMD variants of
# all of them (glibc >= 2.35 for most); math.h declares those only under -ffast-math, which
# would also drop NaN and infinity semantics, so the declarations below add the SIMD
# attribute themselves when the build found that libmvec links (build.py: MO_USE_MVEC).
MVEC_FUNCTIONS = tuple("exp exp2 expm1 log log2 log1p sin cos tan tanh erf".split())
MVEC_BINARY_FUNCTIONS = ("pow", "atan2")


def _libm_declarations() -> str:
    lines = []
    for name in MVEC_FUNCTIONS:
        lines.append(f"float {name}f(float) noexcept MO_SIMD;")
        lines.append(f"double {name}(double) noexcept MO_SIMD;")
    for name in MVEC_BINARY_FUNCTIONS:
        lines.append(f"float {name}f(float, float) noexcept MO_SIMD;")
        lines.append(f"double {name}(double, double) noexcept MO_SIMD;")
    return "\n".join(lines)


# Domain points per kernel below which one thread runs it (MO_PARALLEL_WORK below).
PARALLEL_WORK = 32768
PRELUDE = (
    r"""
#include <stddef.h>
#include <stdint.h>

#ifdef MO_USE_MVEC
#define MO_SIMD __attribute__((__simd__("notinbranch")))
#else
#define MO_SIMD
#endif
extern "C" {
"""
    + _libm_declarations()
    + r"""
void* malloc(size_t) noexcept;
void free(void*) noexcept;
}
// Single instructions (or exact libm calls) through the compiler's builtins.
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
static inline float mo_c_fabs(float x) { return __builtin_fabsf(x); }
static inline double mo_c_fabs(double x) { return __builtin_fabs(x); }
static inline float mo_c_fmod(float a, float b) { return __builtin_fmodf(a, b); }
static inline double mo_c_fmod(double a, double b) { return __builtin_fmod(a, b); }
static inline float mo_c_floor(float x) { return __builtin_floorf(x); }
static inline double mo_c_floor(double x) { return __builtin_floor(x); }
static inline float mo_c_trunc(float x) { return __builtin_truncf(x); }
static inline double mo_c_trunc(double x) { return __builtin_trunc(x); }
static inline float mo_c_copysign(float a, float b) { return __builtin_copysignf(a, b); }
static inline double mo_c_copysign(double a, double b) { return __builtin_copysign(a, b); }

"""
)
PRELUDE += (
    r"""
// Domain points per kernel below which one thread runs it: starting an OpenMP team costs a
// few microseconds, about what 32k elements of simple pointwise work take on one core.
// (PARALLEL_WORK in prelude.py; a kernel of static sizes decides when it is generated.)
#define MO_PARALLEL_WORK """
    + str(PARALLEL_WORK)
    + r"""
// Pointwise work is split into chunks of this many innermost elements, so a kernel with
// few long rows still spreads over the threads.
#define MO_CHUNK 4096
// Transposing kernels run in tiles: MO_TILE values of the variable a load is contiguous in
// (outer) by MO_TILE_J of the innermost, store-contiguous loop. The strided load then reads
// MO_TILE_J sequential streams (which the prefetcher follows) instead of one 4 KiB page per
// element, and each output line is written whole. Measured on a (32, 64, 64, 64) NCHW ->
// channels_last copy (best of 25): 16 x 64: 56 ms; 64 x 16: 16 ms; 256 x 16: 14 ms.
#define MO_TILE 256
#define MO_TILE_J 16
// Partial accumulators per reduction: 16 floats fill two AVX2 or one AVX-512 register.
#define MO_LANES 16
// Rows a column reduction reduces side by side: four 64-byte cache lines of floats.
#define MO_COLUMNS 64
// A column reduction over at most this many columns splits the reduction between the
// threads instead: each thread streams its own run of whole rows (sequential reads the
// prefetcher follows, one page after the other, the columns' accumulators in L1/L2), then
// the partial results are combined column by column.
#define MO_SPLIT_COLUMNS 8192

// -- OpenMP's thread queries (one thread where the compiler has no OpenMP) ---------------
#ifdef _OPENMP
extern "C" int omp_get_thread_num(void) noexcept;
extern "C" int omp_get_num_threads(void) noexcept;
extern "C" int omp_get_max_threads(void) noexcept;
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
#endif

// -- errors: raised in Python after the call -------------------------------------------
#define MO_ERR_ZERO_DIVISION 1
#define MO_ERR_INDEX 2
static int32_t mo_error = 0;
static inline void mo_fail(int32_t code) { __atomic_store_n(&mo_error, code, __ATOMIC_RELAXED); }
static inline int32_t mo_take_error() { return __atomic_exchange_n(&mo_error, 0, __ATOMIC_RELAXED); }

// -- 16-bit floats: stored in their own type, computed in float -------------------------
#if defined(__FLT16_MAX__) && !defined(MO_NO_FLOAT16)
typedef _Float16 mo_half;  // F16C conversions under -march=native; libgcc's otherwise
static inline float mo_h2f(mo_half h) { return (float)h; }
static inline mo_half mo_f2h(float f) { return (mo_half)f; }
#else
// c10/util/Half.h's branch-free conversions (from the FP16 library): exact float tricks.
typedef uint16_t mo_half;
static inline float mo_bits_to_float(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline uint32_t mo_float_to_bits(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
static inline float mo_h2f(mo_half h) {
  const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = mo_bits_to_float((two_w >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
  const float denormalized = mo_bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return mo_bits_to_float(sign | (two_w < (1u << 27) ? mo_float_to_bits(denormalized)
                                                     : mo_float_to_bits(normalized)));
}
static inline mo_half mo_f2h(float f) {  // round to nearest even, as c10::Half(float)
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = mo_float_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = mo_bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = mo_float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
  return (mo_half)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}
#endif

static inline float mo_bf2f(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16; float f; __builtin_memcpy(&f, &bits, 4); return f;
}
static inline uint16_t mo_f2bf(float f) {  // round to nearest even, as c10::BFloat16
  if (f != f) return 0x7fc0;
  uint32_t bits; __builtin_memcpy(&bits, &f, 4);
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// -- index arithmetic (int64, rounding toward -inf like sympy and Python) ---------------
static inline int64_t mo_ifloordiv(int64_t a, int64_t b) {
  if (b == 0) return 0;  // only in lanes that never run (a size of 0)
  int64_t q = a / b;
  return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}
static inline int64_t mo_imod(int64_t a, int64_t b) {
  if (b == 0) return 0;
  int64_t r = a % b;
  return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
static inline int64_t mo_iabs(int64_t a) { return a < 0 ? -a : a; }
static inline int64_t mo_imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t mo_imax(int64_t a, int64_t b) { return a > b ? a : b; }
// An indirect (data-dependent) offset must land in its buffer; a bad one reads element 0
// and reports an IndexError instead of reading out of bounds.
static inline int64_t mo_checked(int64_t i, int64_t extent) {
  if ((uint64_t)i >= (uint64_t)extent) { mo_fail(MO_ERR_INDEX); return 0; }
  return i;
}

// -- pointwise ops ----------------------------------------------------------------------
// Type traits written out rather than from <type_traits>: parsing that header is ~10 ms of
// a ~90 ms kernel build (measured, g++ 12). Same answers as std:: for the types kernels use.
template <typename T, typename U> struct mo_same_t { static constexpr bool value = false; };
template <typename T> struct mo_same_t<T, T> { static constexpr bool value = true; };
template <typename T, typename U> constexpr bool mo_same = mo_same_t<T, U>::value;
template <typename T> constexpr bool mo_is_float =
    mo_same<T, float> || mo_same<T, double> || mo_same<T, long double>;
template <typename T> constexpr bool mo_is_bool = mo_same<T, bool>;
template <typename T> constexpr bool mo_is_signed = T(-1) < T(0);  // false for bool

// Float math: float -> the f-suffixed libm function, double -> the double one, integers
// compute in float (torch gives an int tensor's exp a float32 result).
#define MO_MATH1(name, expr32, expr64)                                      \
  static inline float name(float x) { return expr32; }                      \
  static inline double name(double x) { return expr64; }                    \
  template <typename T> static inline float name(T i) { float x = (float)i; return expr32; }
// exp, tanh and erf in float are the hot functions of softmax and GELU: inline polynomials
// the vectorizer inlines whole (a libmvec call spills every live vector register). Their
// error against the exact value is <= 1, 5 and 6 ulp (tests/backends/test_cpp_backend.py measures
// it); double precision keeps libm.
static inline float mo_bits_float(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline float mo_expf(float x) {
  // Cody-Waite reduction x = n ln2 + r, Cephes' expf polynomial for e^r, times 2^n in two
  // factors (2^128 is not a float). Below -87.33 the result is 0: the exact value is under
  // 1.2e-38 (a subnormal below -87.3365, FLT_MIN's log; torch gives it). Computing
  // subnormals costs ~100 cycles a lane on x86, and exp(-inf) is common: a causal
  // attention mask makes half of them.
  // Written for few vector instructions: each clamp is one min/max that lets a NaN through
  // (x86's minps returns its second operand when either is NaN), and n is rounded by
  // adding 1.5 * 2^23, whose sum holds n in its low mantissa bits (no round or convert
  // instruction; a NaN gives a NaN p, so a NaN result).
  const float high = 88.8f < x ? 88.8f : x;
  const float xc = -87.33f > high ? -87.33f : high;
  const float shifter = 12582912.0f;
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  uint32_t t_bits;
  __builtin_memcpy(&t_bits, &t, 4);
  const int32_t k = (int32_t)(t_bits - 0x4B400000u), half = k >> 1;  // 0x4B400000: shifter
  const float e = p * mo_bits_float((uint32_t)(half + 127) << 23)
                    * mo_bits_float((uint32_t)(k - half + 127) << 23);
  return x < -87.33f ? 0.0f : e;
}
static inline float mo_tanhf(float a) {
  // Eigen's rational approximation (odd degree 13 / even degree 6), clamped where tanh is
  // +-1 in float; the identity below 4e-4 keeps tiny inputs exact.
  const float high = 7.90531110763549805f < a ? 7.90531110763549805f : a;  // min, max:
  const float x = -7.90531110763549805f > high ? -7.90531110763549805f : high;  // NaN kept
  const float x2 = x * x;
  float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  return mo_c_fabs(a) < 0.0004f ? a : x * (p / q);
}
static inline float mo_erff(float a) {
  // Eigen's rational approximation (odd degree 13 / even degree 8) on [-4, 4], where erf
  // reaches +-1 in float.
  const float high = 4.0f < a ? 4.0f : a;
  const float x = -4.0f > high ? -4.0f : high;  // one min, one max; a NaN passes
  const float x2 = x * x;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p + -2.10102402082508e-06f;
  p = x2 * p + -5.69250639462346e-05f;
  p = x2 * p + -7.34990630326855e-04f;
  p = x2 * p + -2.95459980854025e-03f;
  p = x2 * p + -1.60960333262415e-02f;
  float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = x2 * q + -1.68282697438203e-03f;
  q = x2 * q + -7.37332916720468e-03f;
  q = x2 * q + -1.42647390514189e-02f;
  return x * (p / q);  // not (x * p) / q: x * p underflows for tiny x
}

MO_MATH1(mo_exp, mo_expf(x), exp(x))
MO_MATH1(mo_exp2, exp2f(x), exp2(x))
MO_MATH1(mo_expm1, expm1f(x), expm1(x))
MO_MATH1(mo_log, logf(x), log(x))
MO_MATH1(mo_log2, log2f(x), log2(x))
MO_MATH1(mo_log1p, log1pf(x), log1p(x))
MO_MATH1(mo_sqrt, __builtin_sqrtf(x), __builtin_sqrt(x))
MO_MATH1(mo_rsqrt, 1.0f / __builtin_sqrtf(x), 1.0 / __builtin_sqrt(x))
MO_MATH1(mo_sin, sinf(x), sin(x))
MO_MATH1(mo_cos, cosf(x), cos(x))
MO_MATH1(mo_tan, tanf(x), tan(x))
MO_MATH1(mo_tanh, mo_tanhf(x), tanh(x))
MO_MATH1(mo_erf, mo_erff(x), erf(x))
MO_MATH1(mo_sigmoid, 1.0f / (1.0f + mo_expf(-x)), 1.0 / (1.0 + exp(-x)))
MO_MATH1(mo_reciprocal, 1.0f / x, 1.0 / x)

// Rounding ops: the identity on integers. round is half-to-even (torch.round, nearbyint).
#define MO_ROUND1(name, fn32, fn64)                                         \
  static inline float name(float x) { return fn32(x); }                     \
  static inline double name(double x) { return fn64(x); }                   \
  template <typename T> static inline T name(T x) { return x; }
MO_ROUND1(mo_floor, __builtin_floorf, __builtin_floor)
MO_ROUND1(mo_ceil, __builtin_ceilf, __builtin_ceil)
MO_ROUND1(mo_trunc, __builtin_truncf, __builtin_trunc)
MO_ROUND1(mo_round, __builtin_nearbyintf, __builtin_nearbyint)

template <typename T> static inline T mo_abs(T x) {
  if constexpr (mo_is_float<T>) return mo_c_fabs(x);
  else if constexpr (!mo_is_signed<T>) return x;
  else return x < 0 ? (T)-x : x;
}
template <typename T> static inline T mo_relu(T x) { return x < 0 ? (T)0 : x; }  // NaN stays
template <typename T> static inline T mo_sign(T x) { return (T)((x > 0) - (x < 0)); }  // sign(NaN) = 0
template <typename T> static inline T mo_bitwise_not(T x) {
  if constexpr (mo_is_bool<T>) return !x; else return (T)~x;
}
template <typename T> static inline bool mo_isnan(T x) {
  if constexpr (mo_is_float<T>) return x != x; else return false;
}
template <typename T> static inline bool mo_isinf(T x) {
  if constexpr (mo_is_float<T>) return mo_c_fabs(x) == (T)INFINITY; else return false;
}

// maximum/minimum propagate NaN, as torch.maximum does.
template <typename T> static inline T mo_maximum(T a, T b) {
  if constexpr (mo_is_float<T>) return (a > b || a != a) ? a : b; else return a > b ? a : b;
}
template <typename T> static inline T mo_minimum(T a, T b) {
  if constexpr (mo_is_float<T>) return (a < b || a != a) ? a : b; else return a < b ? a : b;
}

template <typename T> static inline bool mo_int_divisor_ok(T b) {
  if (b == 0) { mo_fail(MO_ERR_ZERO_DIVISION); return false; }
  return true;
}
template <typename T> static inline auto mo_truediv(T a, T b) {
  if constexpr (mo_is_float<T>) return a / b; else return (float)a / (float)b;
}
template <typename T> static inline T mo_truncdiv(T a, T b) {
  if constexpr (mo_is_float<T>) return mo_c_trunc(a / b);
  else {
    if (!mo_int_divisor_ok(b)) return 0;
    if constexpr (mo_is_signed<T>) { if (b == -1) return (T)(0 - a); }  // INT_MIN / -1 traps
    return (T)(a / b);
  }
}
template <typename T> static inline T mo_floordiv(T a, T b) {
  if constexpr (mo_is_float<T>) {  // c10::div_floor_floating
    if (b == 0) return a / b;
    T mod = mo_c_fmod(a, b);
    T div = (a - mod) / b;
    if (mod != 0 && (b < 0) != (mod < 0)) div -= (T)1;
    if (div == 0) return mo_c_copysign((T)0, a / b);
    T floored = mo_c_floor(div);
    return div - floored > (T)0.5 ? floored + (T)1 : floored;
  } else {
    if (!mo_int_divisor_ok(b)) return 0;
    if constexpr (mo_is_signed<T>) {
      if (b == -1) return (T)(0 - a);
      if ((a < 0) != (b < 0)) { T q = (T)(a / b); return (T)(a % b != 0 ? q - 1 : q); }
    }
    return (T)(a / b);
  }
}
template <typename T> static inline T mo_fmod(T a, T b) {
  if constexpr (mo_is_float<T>) return mo_c_fmod(a, b);
  else {
    if (!mo_int_divisor_ok(b)) return 0;
    if constexpr (mo_is_signed<T>) { if (b == -1) return 0; }
    return (T)(a % b);
  }
}
template <typename T> static inline T mo_remainder(T a, T b) {  // Python's %: the divisor's sign
  T r = mo_fmod(a, b);
  if constexpr (mo_is_float<T>) { if (r != 0 && ((b < 0) != (r < 0))) r += b; return r; }
  else { if (b != 0 && r != 0 && ((b < 0) != (r < 0))) r = (T)(r + b); return r; }
}
template <typename T> static inline T mo_pow(T a, T b) {
  if constexpr (mo_same<T, float>) return powf(a, b);
  else if constexpr (mo_same<T, double>) return pow(a, b);
  else if constexpr (mo_is_bool<T>) return a || !b;
  else {  // ATen's powi: exact, wrapping on overflow
    if constexpr (mo_is_signed<T>) {
      if (b < 0) return a == 1 ? (T)1 : a == -1 ? (T)(((-b) & 1) ? -1 : 1) : (T)0;
    }
    T result = 1;
    while (b) { if (b & 1) result = (T)(result * a); b = (T)(b / 2); a = (T)(a * a); }
    return result;
  }
}
template <typename T> static inline auto mo_atan2(T a, T b) {
  if constexpr (mo_same<T, double>) return atan2(a, b);
  else return atan2f((float)a, (float)b);
}

// -- reductions: per-lane accumulation steps ---------------------------------------------
// argmax/argmin keep (value, index); NaN counts as the extreme, the first index wins ties.
template <typename T> static inline bool mo_argmax_takes(T v, int64_t i, T best, int64_t best_i) {
  if constexpr (mo_is_float<T>) {
    if (best != best) return v != v && i < best_i;
    return v != v || v > best || (v == best && i < best_i);
  } else return v > best || (v == best && i < best_i);
}
template <typename T> static inline bool mo_argmin_takes(T v, int64_t i, T best, int64_t best_i) {
  if constexpr (mo_is_float<T>) {
    if (best != best) return v != v && i < best_i;
    return v != v || v < best || (v == best && i < best_i);
  } else return v < best || (v == best && i < best_i);
}
"""
)
