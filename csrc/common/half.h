// 16-bit float storage types, free of torch: the layouts of at::Half and at::BFloat16,
// so raw data pointers of those tensors can be reinterpreted as these.
#pragma once

#include <cstdint>
#include <cstring>

namespace sinkdlm {

struct bfloat16 {
  uint16_t bits;
};
struct float16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(bfloat16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

inline bfloat16 to_bfloat16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}

// Exact and branch-free (loops over it vectorise): the half's exponent and mantissa placed in
// float position, times 2^112, re-bias the exponent (15 -> 127) and turn half subnormals into
// exact floats; inf and NaN (exponent 31) are patched.
inline float to_float(float16 x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exp_man = x.bits & 0x7fffu;
  const float magnitude = exp_man >= 0x7c00u ? bits_to_float((exp_man << 13) | 0x7f800000u)
                                             : bits_to_float(exp_man << 13) * 0x1p112f;
  return bits_to_float(float_to_bits(magnitude) | sign);
}

inline float16 to_float16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero): scale into the subnormal range, round to nearest even.
    const float scaled = bits_to_float(a) * 16777216.0f;  // 2^24: one unit = smallest subnormal
    const float r = __builtin_nearbyintf(scaled);
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(r))};
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return {static_cast<uint16_t>(sign | (r >> 13))};
}

// Uniform load/store into the accumulation type.
template <typename acc_t>
inline acc_t load(const float& x) {
  return static_cast<acc_t>(x);
}
template <typename acc_t>
inline acc_t load(const double& x) {
  return static_cast<acc_t>(x);
}
template <typename acc_t>
inline acc_t load(const bfloat16& x) {
  return static_cast<acc_t>(to_float(x));
}
template <typename acc_t>
inline acc_t load(const float16& x) {
  return static_cast<acc_t>(to_float(x));
}

template <typename T>
struct Store;
template <>
struct Store<float> {
  template <typename A>
  static float from(A x) {
    return static_cast<float>(x);
  }
};
template <>
struct Store<double> {
  template <typename A>
  static double from(A x) {
    return static_cast<double>(x);
  }
};
template <>
struct Store<bfloat16> {
  template <typename A>
  static bfloat16 from(A x) {
    return to_bfloat16(static_cast<float>(x));
  }
};
template <>
struct Store<float16> {
  template <typename A>
  static float16 from(A x) {
    return to_float16(static_cast<float>(x));
  }
};

template <typename T, typename A>
inline T store(A x) {
  return Store<T>::from(x);
}

}  // namespace sinkdlm
