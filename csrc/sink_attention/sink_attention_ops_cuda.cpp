// CUDA registration of sink attention: the composed path (sink_attention_composed.h: ATen's fused
// attention, then the sink merged in by cuda/sink_merge.cu) is the CUDA kernel of both
// sinkdlm::sink_attention_{fwd,bwd} and sinkdlm::sink_attention_composed_{fwd,bwd}. Linked only
// into CUDA builds of torch.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sink_attention/sink_attention_composed.h"
#include "sink_merge.h"

namespace sinkdlm::composed {
namespace {

// The kernels take float32, float16 and bfloat16 (ATen's fused attention has no float64) and head
// dims up to kSinkMergeMaxHeadDim; the launchers refuse anything else (cudaErrorInvalidValue),
// these checks say why first.
void check_supported(const SinkAttentionParams& p) {
  TORCH_CHECK_TYPE(p.dtype != ScalarType::kFloat64,
                   "sink_attention: float64 has no fused attention kernel on CUDA");
  TORCH_CHECK(p.head_dim <= kSinkMergeMaxHeadDim, "sink_attention: head_dim must be at most ",
              kSinkMergeMaxHeadDim, " on CUDA, got ", p.head_dim);
}

// Run on the device the op's guard has made current.
void merge_fwd_cuda(const SinkMergeParams& p) {
  check_supported(p);
  C10_CUDA_CHECK(launch_sink_merge_fwd(p, c10::cuda::getCurrentCUDAStream().stream()));
}

void merge_bwd_cuda(const SinkMergeBwdParams& p) {
  check_supported(p);
  const at::Tensor workspace = at::empty(
      {static_cast<int64_t>(sink_merge_bwd_workspace_bytes(p))},
      at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
  C10_CUDA_CHECK(
      launch_sink_merge_bwd(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
}

constexpr MergeKernels kCudaKernels{&merge_fwd_cuda, &merge_bwd_cuda};

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v,
                                            const std::optional<at::Tensor>& sink_k,
                                            const std::optional<at::Tensor>& sink_v,
                                            const std::optional<at::Tensor>& sink_logit,
                                            const std::optional<at::Tensor>& key_padding_mask,
                                            double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  return sink_attention_composed_fwd(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask, scale,
                                     kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& sink_k,
    const std::optional<at::Tensor>& sink_v, const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  return sink_attention_composed_bwd(grad_out, grad_lse, q, k, v, sink_k, sink_v, sink_logit,
                                     key_padding_mask, out, lse, scale, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(sinkdlm, CUDA, m) {
  m.impl("sink_attention_fwd", &fwd_cuda);
  m.impl("sink_attention_bwd", &bwd_cuda);
  m.impl("sink_attention_composed_fwd", &fwd_cuda);
  m.impl("sink_attention_composed_bwd", &bwd_cuda);
}

}  // namespace sinkdlm::composed
