// torch.ops.sinkdlm.attention_mass: schema and the CPU implementation.
// The CUDA implementation is registered in attention_mass_ops_cuda.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "analysis/attention_mass_args.h"
#include "analysis/attention_mass_cpu.h"

namespace sinkdlm {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_mass_cpu_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  at::Tensor sk = check_attention_mass_args(q, k, lse, sink_k, sink_logit, key_padding_mask);
  TORCH_CHECK(q.device().is_cpu(), "attention_mass: CPU kernel got q on ", q.device());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  at::Tensor mass = at::empty({B, H, L}, q.options());
  at::Tensor sink_mass = at::empty({B, H}, q.options());
  if (B * H == 0) return {mass, sink_mass};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_mass_cpu", [&] {
    const auto p = attention_mass_params<scalar_t>(q, k, lse, sk, sink_logit, key_padding_mask,
                                                   scale, mass, sink_mass);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      TORCH_CHECK(attention_mass_cpu(p, begin, end), "attention_mass: invalid parameters");
    });
  });
  return {mass, sink_mass};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinkdlm, m) {
  m.def(
      "attention_mass(Tensor q, Tensor k, Tensor lse, Tensor? sink_k, Tensor? sink_logit, "
      "Tensor? key_padding_mask, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sinkdlm, CPU, m) { m.impl("attention_mass", &attention_mass_cpu_impl); }

}  // namespace sinkdlm
