// CUDA registration of sink attention: the composed path (sink_attention_composed.h: ATen's fused
// attention, then the sink merged in by cuda/sink_merge.cu) is the CUDA kernel of both
// sinkdlm::sink_attention_{fwd,bwd} and sinkdlm::sink_attention_composed_{fwd,bwd}. Linked only
// into CUDA builds of torch.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "sink_attention/sink_attention_composed.h"
#include "sink_merge.h"

namespace sinkdlm::composed {
namespace {

// The CUDA kernels take float, float16 and bfloat16 (ATen's fused attention has no float64).
template <typename Fn>
void dispatch_cuda_type(at::ScalarType dtype, Fn&& fn) {
  TORCH_CHECK_TYPE(dtype != at::kDouble, "sink_attention: float64 is not supported on CUDA");
  dispatch_storage_type(dtype, [&]<typename T, typename A>() {
    if constexpr (!std::is_same_v<T, double>) fn.template operator()<T>();
  });
}

void check_head_dim(int64_t head_dim) {
  TORCH_CHECK(head_dim <= kSinkMergeMaxHeadDim, "sink_attention: head_dim must be at most ",
              kSinkMergeMaxHeadDim, " on CUDA, got ", head_dim);
}

void merge_fwd_cuda(const MergeFwdArgs& a) {
  check_head_dim(a.q.size(3));
  const c10::cuda::CUDAGuard guard(a.q.device());
  dispatch_cuda_type(a.q.scalar_type(), [&]<typename T>() {
    C10_CUDA_CHECK(launch_sink_merge_fwd<T>(make_sink_merge_params<T, float>(a),
                                            c10::cuda::getCurrentCUDAStream().stream()));
  });
}

void merge_bwd_cuda(const MergeBwdArgs& a) {
  check_head_dim(a.q.size(3));
  const c10::cuda::CUDAGuard guard(a.q.device());
  const size_t bytes =
      sink_merge_bwd_workspace_bytes(a.q.size(0), a.q.size(1), a.q.size(2), a.q.size(3));
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)}, a.q.options().dtype(at::kByte));
  dispatch_cuda_type(a.q.scalar_type(), [&]<typename T>() {
    C10_CUDA_CHECK(launch_sink_merge_bwd<T>(make_sink_merge_bwd_params<T, float>(a),
                                            workspace.data_ptr(),
                                            c10::cuda::getCurrentCUDAStream().stream()));
  });
}

constexpr MergeKernels kCudaKernels{&merge_fwd_cuda, &merge_bwd_cuda};

std::tuple<at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v,
    const std::optional<at::Tensor>& sink_logit, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, double scale,
    const std::optional<at::Tensor>& segment_ids) {
  const c10::cuda::CUDAGuard guard(q.device());
  return sink_attention_composed_fwd(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask,
                                     query_padding_mask, scale, segment_ids, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& sink_k,
    const std::optional<at::Tensor>& sink_v, const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale, const std::optional<at::Tensor>& segment_ids) {
  const c10::cuda::CUDAGuard guard(q.device());
  return sink_attention_composed_bwd(grad_out, grad_lse, q, k, v, sink_k, sink_v, sink_logit,
                                     key_padding_mask, query_padding_mask, out, lse, scale,
                                     segment_ids, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(sinkdlm, CUDA, m) {
  m.impl("sink_attention_fwd", &fwd_cuda);
  m.impl("sink_attention_bwd", &bwd_cuda);
  m.impl("sink_attention_composed_fwd", &fwd_cuda);
  m.impl("sink_attention_composed_bwd", &bwd_cuda);
}

}  // namespace sinkdlm::composed
