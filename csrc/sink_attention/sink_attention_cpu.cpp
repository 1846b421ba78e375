// Entry points of the CPU sink attention: the dtype dispatch and the choice of GEMM policy
// (sink_attention_gemms_cpu.h) for the kernel (sink_attention_kernel_cpu.h).
#include "sink_attention/sink_attention_cpu.h"

#include <type_traits>

#include "common/half.h"
#include "sink_attention/sink_attention_gemms_cpu.h"
#include "sink_attention/sink_attention_kernel_cpu.h"

namespace sinkdlm {
namespace {

using sink_attention::Bf16Gemms;
using sink_attention::BlasGemms;

template <template <typename> class Fn, typename... Args>
void dispatch(ScalarType t, Args&&... args) {
  switch (t) {
    case ScalarType::kFloat32:
      return Fn<float>::run(args...);
    case ScalarType::kFloat64:
      return Fn<double>::run(args...);
    case ScalarType::kFloat16:
      return Fn<float16>::run(args...);
    case ScalarType::kBFloat16:
      return Fn<bfloat16>::run(args...);
  }
}

// bf16 inputs take the bf16 GEMMs where the context has them (cpu_context.h's
// choose_bf16_kernels: AMD CPUs with avx512_bf16); everything else, and bf16 elsewhere, the BLAS
// of the accumulation type.
template <typename T>
constexpr bool kBf16 = std::is_same_v<T, bfloat16>;

template <typename T>
struct Fwd {
  static void run(const SinkAttentionParams& p, const CpuContext& ctx) {
    if constexpr (kBf16<T>)
      if (ctx.bf16) return sink_attention::fwd<T, Bf16Gemms>(p, ctx);
    sink_attention::fwd<T, BlasGemms<T>>(p, ctx);
  }
};
template <typename T>
struct Bwd {
  static void run(const SinkAttentionBwdParams& p, const CpuContext& ctx) {
    if constexpr (kBf16<T>)
      if (ctx.bf16) return sink_attention::bwd<T, Bf16Gemms>(p, ctx);
    sink_attention::bwd<T, BlasGemms<T>>(p, ctx);
  }
};

}  // namespace

void sink_attention_fwd_cpu(const SinkAttentionParams& p, const CpuContext& ctx) {
  dispatch<Fwd>(p.dtype, p, ctx);
}

void sink_attention_bwd_cpu(const SinkAttentionBwdParams& p, const CpuContext& ctx) {
  dispatch<Bwd>(p.dtype, p, ctx);
}

}  // namespace sinkdlm
