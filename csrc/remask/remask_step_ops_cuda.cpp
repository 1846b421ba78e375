// CUDA registration of sinkdlm::remask_step: the checks are shared with the CPU registration
// (remask_step_ops.cpp), the kernels live in cuda/remask_step.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "remask/remask_step_ops.h"
#include "remask_step.h"

namespace sinkdlm {
namespace remask {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> remask_step_cuda_impl(
    const at::Tensor& logits, const at::Tensor& x, int64_t mask_id, const at::Tensor& num_transfer,
    const std::optional<at::Tensor>& window, const std::string& strategy, double temperature,
    std::optional<double> threshold, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  RemaskStepCall call = prepare_remask_step(logits, x, mask_id, num_transfer, window, strategy,
                                            temperature, threshold, seed, offset);
  const cudaError_t err = remask_step_cuda(call.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "remask_step: CUDA launch failed: ", cudaGetErrorString(err));
  check_defined_distributions(call);
  return {call.x_new, call.transferred, call.confidence};
}

}  // namespace
}  // namespace remask
}  // namespace sinkdlm

TORCH_LIBRARY_IMPL(sinkdlm, CUDA, m) {
  m.impl("remask_step", &sinkdlm::remask::remask_step_cuda_impl);
}
