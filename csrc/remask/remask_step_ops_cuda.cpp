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
  const at::Tensor num_transfer_contiguous = num_transfer.contiguous();
  at::Tensor logits_used, window_used;
  RemaskStepParams params;
  check_remask_step_args(logits, x, mask_id, num_transfer_contiguous, window, strategy, temperature,
                         threshold, seed, offset, logits_used, window_used, params);
  const auto shape = x.sizes();
  at::Tensor x_new = at::empty(shape, x.options());
  at::Tensor transferred = at::empty(shape, x.options().dtype(at::kBool));
  at::Tensor confidence = at::empty(shape, x.options().dtype(at::kFloat));
  params.x_new = x_new.data_ptr<int64_t>();
  params.transferred = transferred.data_ptr<bool>();
  params.confidence = confidence.data_ptr<float>();
  const cudaError_t err = remask_step_cuda(params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "remask_step: CUDA launch failed: ", cudaGetErrorString(err));
  return {x_new, transferred, confidence};
}

}  // namespace
}  // namespace remask
}  // namespace sinkdlm

TORCH_LIBRARY_IMPL(sinkdlm, CUDA, m) {
  m.impl("remask_step", &sinkdlm::remask::remask_step_cuda_impl);
}
