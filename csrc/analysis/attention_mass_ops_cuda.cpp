// CUDA registration of sinkdlm::attention_mass (schema in attention_mass_ops.cpp); the kernel is
// the torch-free launcher in cuda/attention_mass.cu. Linked only into CUDA builds of torch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "analysis/attention_mass_args.h"
#include "attention_mass.h"

namespace sinkdlm {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_mass_cuda_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  std::vector<at::Tensor> keep;
  AttentionMassParams p =
      make_attention_mass_params(q, k, lse, sink_k, sink_logit, key_padding_mask, scale, keep);
  TORCH_CHECK(q.device().is_cuda(), "attention_mass: CUDA kernel got q on ", q.device());
  TORCH_CHECK_TYPE(!p.qk_bfloat16,
                   "attention_mass: the CUDA kernel takes float32 or float64 q and k, got "
                   "bfloat16 (sinkdlm.analysis.attention_mass converts them)");
  const c10::cuda::CUDAGuard guard(q.device());
  auto outputs = attention_mass_outputs(q, p);
  C10_CUDA_CHECK(attention_mass_cuda(p, c10::cuda::getCurrentCUDAStream().stream()));
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(sinkdlm, CUDA, m) { m.impl("attention_mass", &attention_mass_cuda_impl); }

}  // namespace sinkdlm
