// The op registrations' side of the torch-free kernels: the CPU context they run on, and torch
// dtypes and strides in the kernels' terms. Torch header: only *_ops*.cpp include it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/cpu_context.h"
#include "common/kernel_types.h"

namespace sinkdlm {

// at::parallel_for and the BLAS torch has loaded (with the avx512_bf16 GEMMs where the CPU has
// them), made once.
inline const CpuContext& torch_cpu_context() {
  static const CpuContext ctx = make_cpu_context(
      [](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
        at::parallel_for(0, n, grain, fn);
      });
  return ctx;
}

// The kernels' name of a dtype the op has already checked.
inline ScalarType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ScalarType::kFloat32;
    case at::kDouble:
      return ScalarType::kFloat64;
    case at::kHalf:
      return ScalarType::kFloat16;
    case at::kBFloat16:
      return ScalarType::kBFloat16;
    default:
      TORCH_INTERNAL_ASSERT(false, "no kernel dtype for ", t);
  }
}

// Strides of a (B, H, L, D) tensor, of a (B, H, L) one, and of the first two dimensions of a
// (B, L, ...) one.
inline Strides4 strides4(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}
inline Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
inline Strides2 strides2(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

}  // namespace sinkdlm
