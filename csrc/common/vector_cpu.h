// GCC vector-extension helpers shared by the CPU kernels' inner loops (row_ops_cpu.cpp,
// sink_merge_cpu.cpp): 16 float lanes, the 16-bit conversions of half.h lane by lane, and a
// polynomial exp. Include it only in files whose functions are compiled per instruction set
// (SINKDLM_TARGET_CLONES): each clone lowers the vectors to its own registers (1 zmm, 2 ymm or
// 4 xmm), written this way rather than left to the auto-vectoriser, which gives up on the
// selects and reductions below.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#include "common/half.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // see SINKDLM_INLINE below

// Internal linkage: each file (and each clone in it) gets its own copies, so no out-of-line
// copy compiled for one instruction set can stand in for another.
namespace sinkdlm::vec {
namespace {

using vfloat = float __attribute__((vector_size(64)));
using vint = int32_t __attribute__((vector_size(64)));
using vuint = uint32_t __attribute__((vector_size(64)));
using vhalf = uint16_t __attribute__((vector_size(32)));  // 16 bfloat16 / float16 bit patterns
constexpr int64_t kLanes = 16;

// Every helper taking or returning a vector is inlined into each clone: called out of line,
// clones compiled for different ISAs would disagree on how a 64-byte vector is passed.
#define SINKDLM_INLINE inline __attribute__((always_inline))

SINKDLM_INLINE vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
SINKDLM_INLINE void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
SINKDLM_INLINE vhalf vload_half(const void* p) {
  vhalf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
SINKDLM_INLINE void vstore_half(void* p, vhalf v) { std::memcpy(p, &v, sizeof v); }
SINKDLM_INLINE vfloat as_float(vuint u) { return std::bit_cast<vfloat>(u); }
SINKDLM_INLINE vuint as_uint(vfloat f) { return std::bit_cast<vuint>(f); }
SINKDLM_INLINE float hsum(vfloat v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
SINKDLM_INLINE float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Sum of the lanes as a tree (4 dependent adds instead of hsum's 15): for loops that reduce one
// short row at a time, where the sum's latency is the cost.
SINKDLM_INLINE float hsum_tree(vfloat v) {
  using v8 = float __attribute__((vector_size(32)));
  using v4 = float __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b =
      __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// exp for float: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial (relative
// error ~2e-7), 2^n through the exponent bits. Inputs below -87 (and -inf) give exactly 0.
// One template serves the vector loop body (V = vfloat) and its scalar tail (V = float).
template <typename V>
SINKDLM_INLINE V exp_poly(V r) {
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

SINKDLM_INLINE vfloat fast_exp(vfloat x) {
  const vfloat lo = vfloat{} - 87.0f, hi = vfloat{} + 88.5f;
  const vfloat xc = x < lo ? lo : (x > hi ? hi : x);
  // Round to nearest by the 1.5 * 2^23 trick (no vector floor in the extensions).
  const vfloat n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vfloat r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat y = exp_poly(r) * reinterpret_cast<const vfloat&>(bits);
  return x < lo ? vfloat{} : y;
}

SINKDLM_INLINE float fast_exp(float x) {
  if (!(x >= -87.0f)) return x != x ? x : 0.0f;  // NaN stays NaN
  const float xc = x > 88.5f ? 88.5f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return exp_poly(r) * scale;
}

// log for positive, finite, normal floats (the callers' sums of exps lie in [1, 3]): x = 2^e m
// with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| <= 0.172, by
// its series to t^9 (error below 1e-9 before rounding). NaN stays NaN.
SINKDLM_INLINE vfloat fast_log(vfloat x) {
  const vuint u = as_uint(x);
  vint e = std::bit_cast<vint>(u) >> 23;
  vfloat m = as_float((u & 0x7fffffu) | 0x3f800000u);
  const vint big = m > 1.41421356f;  // -1 where m is past sqrt(2)
  m = big ? m * 0.5f : m;
  e -= 127 + big;  // big is -1 there
  const vfloat t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
  vfloat p = t2 * (1.0f / 9) + (1.0f / 7);
  p = p * t2 + (1.0f / 5);
  p = p * t2 + (1.0f / 3);
  p = p * t2 + 1.0f;
  const vfloat y = __builtin_convertvector(e, vfloat) * 0.693147180559945309f + 2.0f * t * p;
  return x != x ? x : y;
}

// The 16-bit conversions of half.h, lane by lane, branch-free (selects instead of its early
// returns) so that each clone keeps them in vector registers.
SINKDLM_INLINE vfloat widen_bf16(vhalf h) {
  return as_float(__builtin_convertvector(h, vuint) << 16);
}

SINKDLM_INLINE vfloat widen_f16(vhalf h) {
  const vuint w = __builtin_convertvector(h, vuint);
  const vuint sign = (w & 0x8000u) << 16, exp_man = w & 0x7fffu;
  const vuint special = (exp_man << 13) | 0x7f800000u;  // inf, NaN
  const vuint finite = as_uint(as_float(exp_man << 13) * 0x1p112f);
  return as_float((exp_man >= 0x7c00u ? special : finite) | sign);
}

SINKDLM_INLINE vhalf narrow_bf16(vfloat f) {
  const vuint u = as_uint(f);
  const vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vuint nan = (u >> 16) | 0x40u;
  return __builtin_convertvector((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded, vhalf);
}

SINKDLM_INLINE vhalf narrow_f16(vfloat f) {
  const vuint u = as_uint(f);
  const vuint sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  const vuint rebiased = a - 0x38000000u;  // exponent 127 -> 15; wraps where a is subnormal
  const vuint normal = (rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13;
  // A subnormal result: one unit is the smallest subnormal (2^-24), rounded to nearest even by
  // the 1.5 * 2^23 trick (the product is exact, so contracting it into an FMA changes nothing).
  const vfloat scaled = as_float(a) * 16777216.0f;
  const vuint subnormal = __builtin_convertvector(
      __builtin_convertvector((scaled + 12582912.0f) - 12582912.0f, vint), vuint);
  const vuint inf = vuint{} + 0x7c00u, nan = vuint{} + 0x7e00u;
  vuint r = a < 0x38800000u ? subnormal : normal;
  r = a >= 0x477ff000u ? inf : r;
  r = a > 0x7f800000u ? nan : r;
  return __builtin_convertvector(r | sign, vhalf);
}

// 16 elements of a row of T as floats, and back (rounded to nearest even).
SINKDLM_INLINE vfloat load16(const float* p) { return vload(p); }
SINKDLM_INLINE vfloat load16(const bfloat16* p) { return widen_bf16(vload_half(p)); }
SINKDLM_INLINE vfloat load16(const float16* p) { return widen_f16(vload_half(p)); }
SINKDLM_INLINE void store16(float* p, vfloat v) { vstore(p, v); }
SINKDLM_INLINE void store16(bfloat16* p, vfloat v) { vstore_half(p, narrow_bf16(v)); }
SINKDLM_INLINE void store16(float16* p, vfloat v) { vstore_half(p, narrow_f16(v)); }

}  // namespace
}  // namespace sinkdlm::vec
