// Philox4x32-10 counter-based RNG (Salmon et al., SC'11), shared by the CPU core and the CUDA
// kernel so that both draw the same noise. The remasking step's noise is a pure function of
// (seed, offset, b, l, v):
//   counter = (v / 4, l, b, offset), key = (seed low 32 bits, seed high 32 bits),
//   word v % 4 of the output -> uniform u in (0, 1) -> Gumbel g = -log(-log(u)).
// The per-position uniform of the "random" strategy uses counter (0xFFFFFFFF, l, b, offset), word 0
// (v / 4 never reaches 0xFFFFFFFF for a vocabulary below 2^34).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SINKDLM_HD __host__ __device__ __forceinline__
#else
#define SINKDLM_HD inline
#endif

namespace sinkdlm {
namespace philox {

constexpr uint32_t kRandomStrategyWord = 0xFFFFFFFFu;

struct Uint4 {
  uint32_t x, y, z, w;
};

SINKDLM_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;

// (remask_step_cpu.cpp runs eight of these side by side in gumbel32.)
SINKDLM_HD Uint4 philox4x32_10(Uint4 counter, uint32_t key0, uint32_t key1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kMul0, counter.x, &hi0);
    const uint32_t lo1 = mulhilo(kMul1, counter.z, &hi1);
    counter = Uint4{hi1 ^ counter.y ^ key0, lo1, hi0 ^ counter.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// Uniform in (0, 1): the top 24 bits, centred, so neither 0 nor 1 can come out and the
// float is exact.
SINKDLM_HD float uint_to_uniform(uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// Basic float operations that no compiler may fuse into FMAs (on the device; the host library is
// built without FMA), so that host, device and the vectorised CPU path compute the same bits.
SINKDLM_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SINKDLM_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SINKDLM_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
SINKDLM_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}
SINKDLM_HD float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  __builtin_memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// Natural log of a positive normal float within ~2 ulp, from basic operations only (libm's and
// CUDA's logf differ in the last bit). x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, odd series to s^9.
// remask_step_cpu.cpp has an 8-lane copy (log_positive8) with the same operations in the same
// order.
constexpr uint32_t kSqrt2Bits = 0x3FB504F3u;
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723212e-6f;
SINKDLM_HD float log_positive(float x) {
  const uint32_t bits = float_bits(x);
  int32_t exponent = static_cast<int32_t>(bits >> 23) - 127;
  uint32_t mantissa = (bits & 0x7FFFFFu) | 0x3F800000u;
  if (mantissa > kSqrt2Bits) {
    mantissa -= 0x00800000u;
    exponent += 1;
  }
  const float f = add_rn(bits_float(mantissa), -1.0f);
  const float s = div_rn(f, add_rn(f, 2.0f));
  const float s2 = mul_rn(s, s);
  float poly = add_rn(mul_rn(s2, 1.0f / 9.0f), 1.0f / 7.0f);
  poly = add_rn(mul_rn(poly, s2), 1.0f / 5.0f);
  poly = add_rn(mul_rn(poly, s2), 1.0f / 3.0f);
  poly = mul_rn(poly, s2);
  const float two_s = add_rn(s, s);
  const float log_m = add_rn(two_s, mul_rn(two_s, poly));
  const float e = static_cast<float>(exponent);
  return add_rn(mul_rn(e, kLn2Hi), add_rn(log_m, mul_rn(e, kLn2Lo)));
}

SINKDLM_HD float uniform_to_gumbel(float u) { return -log_positive(-log_positive(u)); }

SINKDLM_HD uint32_t word(const Uint4& r, uint32_t lane) {
  return lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
}

// The four Philox words covering vocabulary entries [4 * (v / 4), 4 * (v / 4) + 4).
SINKDLM_HD Uint4 noise_block(uint64_t seed, uint32_t offset, int64_t b, int64_t l, int64_t v) {
  return philox4x32_10(Uint4{static_cast<uint32_t>(v >> 2), static_cast<uint32_t>(l),
                             static_cast<uint32_t>(b), offset},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

SINKDLM_HD float gumbel(uint64_t seed, uint32_t offset, int64_t b, int64_t l, int64_t v) {
  return uniform_to_gumbel(
      uint_to_uniform(word(noise_block(seed, offset, b, l, v), static_cast<uint32_t>(v & 3))));
}

SINKDLM_HD float position_uniform(uint64_t seed, uint32_t offset, int64_t b, int64_t l) {
  return uint_to_uniform(
      philox4x32_10(
          Uint4{kRandomStrategyWord, static_cast<uint32_t>(l), static_cast<uint32_t>(b), offset},
          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32))
          .x);
}

}  // namespace philox
}  // namespace sinkdlm
