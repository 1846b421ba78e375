// common/vector_cpu.h: the vector exp, log and lane sum the CPU kernels' inner loops use,
// against libm in double.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "common/vector_cpu.h"

namespace sinkdlm::vec {
namespace {

TEST(VectorCpu, FastLogMatchesLibm) {
  // The merge's sums of exps lie in [1, 3]; the function holds for every positive normal float.
  for (float lo : {1.0f, 1e-30f, 0.7f, 1.4142f, 2.0f, 1e30f}) {
    vfloat x;
    for (int i = 0; i < kLanes; ++i) x[i] = lo * (1.0f + 0.137f * i);
    const vfloat y = fast_log(x);
    for (int i = 0; i < kLanes; ++i) {
      const double want = std::log(static_cast<double>(x[i]));
      EXPECT_NEAR(y[i], want, 2e-7 * std::max(1.0, std::fabs(want))) << x[i];
    }
  }
  vfloat nan{};
  nan[3] = std::numeric_limits<float>::quiet_NaN();
  nan[0] = 1.0f;
  const vfloat y = fast_log(nan);
  EXPECT_TRUE(std::isnan(y[3]));
  EXPECT_EQ(y[0], 0.0f);
}

TEST(VectorCpu, FastExpMatchesLibm) {
  vfloat x;
  for (int i = 0; i < kLanes; ++i) x[i] = -86.0f + 11.3f * i;  // up to 83.5
  const vfloat y = fast_exp(x);
  for (int i = 0; i < kLanes; ++i)
    EXPECT_NEAR(y[i] / std::exp(static_cast<double>(x[i])), 1.0, 5e-7) << x[i];
  x[0] = -std::numeric_limits<float>::infinity();
  EXPECT_EQ(fast_exp(x)[0], 0.0f);
}

TEST(VectorCpu, HsumTreeAddsEveryLane) {
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(1 << i);  // exact in any order
  EXPECT_EQ(hsum_tree(v), static_cast<float>((1 << kLanes) - 1));
}

}  // namespace
}  // namespace sinkdlm::vec
