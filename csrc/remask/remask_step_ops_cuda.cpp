// CUDA registration of sinkdlm::remask_step: the checks are shared with the CPU registration
// (remask_step_args.h), the kernels live in cuda/remask_step.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "remask/remask_step_args.h"
#include "remask_step.h"

namespace sinkdlm {
namespace remask {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> remask_step_cuda_impl(
    const at::Tensor& logits, const at::Tensor& x, int64_t mask_id, const at::Tensor& num_transfer,
    const std::optional<at::Tensor>& window, const std::string& strategy, double temperature,
    std::optional<double> threshold, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  std::vector<at::Tensor> keep;
  RemaskStepParams p = make_remask_step_params(logits, x, mask_id, num_transfer, window, strategy,
                                               temperature, threshold, seed, offset, keep);
  auto outputs = remask_step_outputs(x, p);
  const cudaError_t err = remask_step_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "remask_step: CUDA launch failed: ", cudaGetErrorString(err));
  check_defined_distributions(std::get<2>(outputs));
  return outputs;
}

}  // namespace
}  // namespace remask
}  // namespace sinkdlm

TORCH_LIBRARY_IMPL(sinkdlm, CUDA, m) {
  m.impl("remask_step", &sinkdlm::remask::remask_step_cuda_impl);
}
