// torch.ops.sinkdlm.attention_mass: schema, argument checks and the CPU implementation.
// The CUDA implementation is registered in attention_mass_ops_cuda.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "analysis/attention_mass_cpu.h"

namespace sinkdlm {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_mass_cpu_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  TORCH_CHECK(q.dim() == 4, "attention_mass: q must be (B,H,L,D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "attention_mass: k must be (B,Hkv,L,D), got ", k.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(2) == L && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "attention_mass: k must be (B,Hkv,L,D) with H % Hkv == 0 for q ", q.sizes(),
              ", got ", k.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "attention_mass: q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && lse.scalar_type() == q.scalar_type(),
              "attention_mass: k and lse must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type(), " and ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == L,
              "attention_mass: lse must be (B,H,L) = (", B, ",", H, ",", L, "), got ",
              lse.sizes());
  at::Tensor sk;
  if (sink_k.has_value()) {
    sk = *sink_k;
    TORCH_CHECK(sk.scalar_type() == q.scalar_type(), "attention_mass: sink_k dtype must be ",
                q.scalar_type(), ", got ", sk.scalar_type());
    if (sk.dim() == 2) sk = sk.unsqueeze(0).expand({B, sk.size(0), sk.size(1)});
    TORCH_CHECK(sk.dim() == 3 && sk.size(0) == B && sk.size(1) == Hkv && sk.size(2) == D,
                "attention_mass: sink_k must be (Hkv,D) or (B,Hkv,D), got ", sink_k->sizes());
  }
  if (sink_logit.has_value()) {
    TORCH_CHECK(sink_logit->dim() == 1 && sink_logit->size(0) == H &&
                    sink_logit->scalar_type() == q.scalar_type(),
                "attention_mass: sink_logit must be (H,) of dtype ", q.scalar_type(), ", got ",
                sink_logit->sizes(), " ", sink_logit->scalar_type());
  }
  if (key_padding_mask.has_value()) {
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool && key_padding_mask->dim() == 2 &&
                    key_padding_mask->size(0) == B && key_padding_mask->size(1) == L,
                "attention_mass: key_padding_mask must be bool (B,L), got ",
                key_padding_mask->sizes(), " ", key_padding_mask->scalar_type());
  }
  for (const at::Tensor* t : {&q, &k, &lse}) {
    TORCH_CHECK(t->device().is_cpu(), "attention_mass: CPU kernel got a tensor on ", t->device());
  }

  at::Tensor mass = at::empty({B, H, L}, q.options());
  at::Tensor sink_mass = at::empty({B, H}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_mass_cpu", [&] {
    AttentionMassParams<scalar_t> p;
    p.q = q.const_data_ptr<scalar_t>();
    p.k = k.const_data_ptr<scalar_t>();
    p.lse = lse.const_data_ptr<scalar_t>();
    for (int i = 0; i < 4; ++i) {
      p.q_stride[i] = q.stride(i);
      p.k_stride[i] = k.stride(i);
    }
    for (int i = 0; i < 3; ++i) p.lse_stride[i] = lse.stride(i);
    if (sk.defined()) {
      p.sink_k = sk.const_data_ptr<scalar_t>();
      for (int i = 0; i < 3; ++i) p.sink_k_stride[i] = sk.stride(i);
    }
    if (sink_logit.has_value()) {
      p.sink_logit = sink_logit->const_data_ptr<scalar_t>();
      p.sink_logit_stride = sink_logit->stride(0);
    }
    if (key_padding_mask.has_value()) {
      p.key_padding_mask = key_padding_mask->const_data_ptr<bool>();
      p.mask_stride[0] = key_padding_mask->stride(0);
      p.mask_stride[1] = key_padding_mask->stride(1);
    }
    p.mass = mass.mutable_data_ptr<scalar_t>();
    p.sink_mass = sink_mass.mutable_data_ptr<scalar_t>();
    p.batch = B;
    p.heads = H;
    p.kv_heads = Hkv;
    p.seq_len = L;
    p.head_dim = D;
    p.scale = scale;
    if (B * H == 0) return;
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
