// common/half.h: the 16-bit float conversions every CPU kernel loads and stores through, and
// their vector forms (vector_cpu.h: load16 / store16), which must give the same bits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/half.h"
#include "common/vector_cpu.h"

namespace sinkdlm {
namespace {

TEST(Half, KnownValues) {
  EXPECT_EQ(to_float(bfloat16{0x3F80}), 1.0f);
  EXPECT_EQ(to_float(bfloat16{0xC040}), -3.0f);
  EXPECT_EQ(to_float(float16{0x3C00}), 1.0f);
  EXPECT_EQ(to_float(float16{0xC000}), -2.0f);
  EXPECT_EQ(to_float(float16{0x7BFF}), 65504.0f);
  EXPECT_EQ(to_float(float16{0x0001}), std::ldexp(1.0f, -24));     // smallest subnormal
  EXPECT_EQ(to_float(float16{0x03FF}), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(to_float(float16{0xFC00}), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit(to_float(float16{0x8000})));
  EXPECT_TRUE(std::isnan(to_float(float16{0x7E00})));
}

// Every half is exactly representable as a float: float -> half gives the same bits back.
TEST(Half, EveryFloat16RoundTrips) {
  for (uint32_t bits = 0; bits <= 0xFFFFu; ++bits) {
    const float16 h{static_cast<uint16_t>(bits)};
    const float f = to_float(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(to_float(to_float16(f)))) << bits;
      continue;
    }
    ASSERT_EQ(to_float16(f).bits, h.bits) << "bits " << bits;
  }
}

TEST(Half, EveryBfloat16RoundTrips) {
  for (uint32_t bits = 0; bits <= 0xFFFFu; ++bits) {
    const bfloat16 h{static_cast<uint16_t>(bits)};
    const float f = to_float(h);
    if (std::isnan(f)) continue;
    ASSERT_EQ(to_bfloat16(f).bits, h.bits) << "bits " << bits;
  }
}

// Every 16-bit pattern.
template <typename H>
void expect_widen_matches_scalar() {
  std::vector<H> src(0x10000);
  for (size_t i = 0; i < src.size(); ++i) src[i].bits = static_cast<uint16_t>(i);
  std::vector<float> dst(src.size(), -1.0f);
  for (size_t i = 0; i < src.size(); i += vec::kLanes)
    vec::vstore(dst.data() + i, vec::load16(src.data() + i));
  for (size_t i = 0; i < src.size(); ++i) {
    const float want = to_float(src[i]);
    uint32_t got_bits, want_bits;
    std::memcpy(&got_bits, &dst[i], 4);
    std::memcpy(&want_bits, &want, 4);
    ASSERT_EQ(got_bits, want_bits) << "bits " << src[i].bits;
  }
}

TEST(HalfVectors, WidenMatchesScalar) {
  expect_widen_matches_scalar<bfloat16>();
  expect_widen_matches_scalar<float16>();
}

// Floats that exercise every rounding decision: each of the 2^16 high halves with low halves at
// and around both formats' rounding points (the bfloat16 one at bit 15, the float16 one at bit
// 12 of a normal), plus random patterns (float16 subnormals round at other bits).
std::vector<float> rounding_cases() {
  const uint32_t lows[] = {0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x2fff,
                           0x3000, 0x3001, 0x7fff, 0x8000, 0x8001, 0xbfff, 0xc000, 0xffff};
  std::vector<float> out;
  for (uint32_t high = 0; high <= 0xffffu; ++high)
    for (uint32_t low : lows) {
      const uint32_t u = high << 16 | low;
      float f;
      std::memcpy(&f, &u, 4);
      out.push_back(f);
    }
  std::mt19937 gen(7);
  for (int i = 0; i < (1 << 20); ++i) {  // keeps the count a multiple of the 16 lanes
    const uint32_t u = gen();
    float f;
    std::memcpy(&f, &u, 4);
    out.push_back(f);
  }
  return out;
}

template <typename H, typename Scalar>
void expect_narrow_matches_scalar(Scalar scalar) {
  const std::vector<float> src = rounding_cases();
  std::vector<H> dst(src.size());
  for (H& h : dst) h.bits = 0x5555;  // poison
  for (size_t i = 0; i < src.size(); i += vec::kLanes)
    vec::store16(dst.data() + i, vec::vload(src.data() + i));
  for (size_t i = 0; i < src.size(); ++i) {
    uint32_t u;
    std::memcpy(&u, &src[i], 4);
    ASSERT_EQ(dst[i].bits, scalar(src[i]).bits) << "float bits " << std::hex << u;
  }
}

TEST(HalfVectors, NarrowMatchesScalar) {
  expect_narrow_matches_scalar<bfloat16>([](float f) { return to_bfloat16(f); });
  expect_narrow_matches_scalar<float16>([](float f) { return to_float16(f); });
}

}  // namespace
}  // namespace sinkdlm
