// common/half.h: the 16-bit float conversions every CPU kernel loads and stores through.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/half.h"

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

}  // namespace
}  // namespace sinkdlm
