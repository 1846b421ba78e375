// The rule that picks the bf16 GEMM kernels (cpu_context.h's choose_bf16_kernels), by forcing the
// CPU facts and the SINKDLM_CPU_BF16_GEMM override.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "common/cpu_context.h"
#include "common/gemm_bf16_cpu.h"

namespace sinkdlm {
namespace {

const bf16::Kernels* avx512() { return bf16::avx512_kernels(); }

TEST(ChooseBf16Kernels, VdpBf16OnAmdWithAvx512Bf16Only) {
  if (avx512() == nullptr) GTEST_SKIP() << "this CPU lacks avx512_bf16: no kernels to pick";
  for (const char* name : {static_cast<const char*>(nullptr), "", "auto"}) {
    EXPECT_EQ(choose_bf16_kernels({/*avx512_bf16=*/true, /*amd=*/true}, name), avx512());
    EXPECT_EQ(choose_bf16_kernels({/*avx512_bf16=*/true, /*amd=*/false}, name), nullptr);
  }
}

TEST(ChooseBf16Kernels, Fp32WithoutAvx512Bf16) {
  EXPECT_EQ(choose_bf16_kernels({false, true}, nullptr), nullptr);
  EXPECT_EQ(choose_bf16_kernels({false, false}, "auto"), nullptr);
}

TEST(ChooseBf16Kernels, OverrideForcesEachPath) {
  const CpuFeatures intel{true, false}, none{false, false};
  EXPECT_EQ(choose_bf16_kernels(intel, "fp32"), nullptr);
  EXPECT_EQ(choose_bf16_kernels(none, "portable"), &bf16::portable_kernels());
  EXPECT_THROW(choose_bf16_kernels(none, "avx512_bf16"), std::invalid_argument);
  if (avx512() != nullptr) EXPECT_EQ(choose_bf16_kernels(intel, "avx512_bf16"), avx512());
}

TEST(ChooseBf16Kernels, UnknownOverrideRaisesNamingTheChoices) {
  try {
    choose_bf16_kernels({true, true}, "amx");
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("auto, avx512_bf16, fp32 or portable"), std::string::npos);
  }
}

TEST(ChooseBf16Kernels, DetectedFeaturesMatchTheKernels) {
  EXPECT_EQ(detect_cpu_features().avx512_bf16, avx512() != nullptr);
}

}  // namespace
}  // namespace sinkdlm
