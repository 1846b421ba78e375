// torch.ops.sinkdlm.attention_mass: schema, argument checks and the CPU implementation.
// The CUDA implementation is registered in attention_mass_ops_cuda.cpp.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "analysis/attention_mass_args.h"
#include "analysis/attention_mass_cpu.h"
#include "common/torch_interop.h"

namespace sinkdlm {

AttentionMassParams make_attention_mass_params(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& lse,
                                               const std::optional<at::Tensor>& sink_k,
                                               const std::optional<at::Tensor>& sink_logit,
                                               const std::optional<at::Tensor>& key_padding_mask,
                                               double scale, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(q.dim() == 4, "attention_mass: q must be (B,H,L,D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "attention_mass: k must be (B,Hkv,L,D), got ", k.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(2) == L && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "attention_mass: k must be (B,Hkv,L,D) with H % Hkv == 0 for q ", q.sizes(), ", got ",
              k.sizes());
  // bfloat16 q and k (CPU) keep their dtype for the score GEMMs; the rest is float32 then.
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble || bf16,
                   "attention_mass: q must be float32, float64 or bfloat16, got ", q.scalar_type());
  const at::ScalarType acc = bf16 ? at::kFloat : q.scalar_type();
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && lse.scalar_type() == acc,
                   "attention_mass: k must have q's dtype ", q.scalar_type(), " and lse dtype ",
                   acc, ", got ", k.scalar_type(), " and ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == L,
              "attention_mass: lse must be (B,H,L) = (", B, ",", H, ",", L, "), got ", lse.sizes());
  std::vector<const at::Tensor*> all = {&k, &lse};
  if (sink_k.has_value()) {
    const at::Tensor& sk = *sink_k;
    TORCH_CHECK(sk.scalar_type() == acc, "attention_mass: sink_k dtype must be ", acc, ", got ",
                sk.scalar_type());
    const bool ok = (sk.dim() == 2 && sk.size(0) == Hkv && sk.size(1) == D) ||
                    (sk.dim() == 3 && sk.size(0) == B && sk.size(1) == Hkv && sk.size(2) == D);
    TORCH_CHECK(ok, "attention_mass: sink_k must be (Hkv,D) or (B,Hkv,D), got ", sk.sizes());
    all.push_back(&sk);
  }
  if (sink_logit.has_value()) {
    TORCH_CHECK(
        sink_logit->dim() == 1 && sink_logit->size(0) == H && sink_logit->scalar_type() == acc,
        "attention_mass: sink_logit must be (H,) of dtype ", acc, ", got ", sink_logit->sizes(),
        " ", sink_logit->scalar_type());
    all.push_back(&*sink_logit);
  }
  if (key_padding_mask.has_value()) {
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool && key_padding_mask->dim() == 2 &&
                    key_padding_mask->size(0) == B && key_padding_mask->size(1) == L,
                "attention_mass: key_padding_mask must be bool (B,L), got ",
                key_padding_mask->sizes(), " ", key_padding_mask->scalar_type());
    all.push_back(&*key_padding_mask);
  }
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->device() == q.device(), "attention_mass: all tensors must be on q's device ",
                q.device(), ", got one on ", t->device());
  }

  AttentionMassParams p;
  p.dtype = kernel_dtype(acc);
  p.qk_bfloat16 = bf16;
  p.batch = B, p.heads = H, p.kv_heads = Hkv, p.seq_len = L, p.head_dim = D, p.scale = scale;
  p.q = q.data_ptr(), p.q_stride = strides4(q);
  p.k = k.data_ptr(), p.k_stride = strides4(k);
  keep.push_back(lse.contiguous());
  p.lse = keep.back().data_ptr();
  if (sink_k.has_value()) {
    keep.push_back(sink_k->contiguous());
    p.sink_k = keep.back().data_ptr();
    p.sink_batch_stride = sink_k->dim() == 3 ? Hkv * D : 0;
  }
  if (sink_logit.has_value()) {
    keep.push_back(sink_logit->contiguous());
    p.sink_logit = keep.back().data_ptr();
  }
  if (key_padding_mask.has_value()) {
    keep.push_back(key_padding_mask->contiguous());
    p.key_padding_mask = keep.back().data_ptr<bool>();
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_mass_outputs(const at::Tensor& q,
                                                          AttentionMassParams& p) {
  const auto options = q.options().dtype(p.qk_bfloat16 ? at::kFloat : q.scalar_type());
  at::Tensor mass = at::empty({p.batch, p.heads, p.seq_len}, options);
  at::Tensor sink_mass = at::empty({p.batch, p.heads}, options);
  p.mass = mass.data_ptr();
  p.sink_mass = sink_mass.data_ptr();
  return {mass, sink_mass};
}

namespace {

std::tuple<at::Tensor, at::Tensor> attention_mass_cpu_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  std::vector<at::Tensor> keep;
  AttentionMassParams p =
      make_attention_mass_params(q, k, lse, sink_k, sink_logit, key_padding_mask, scale, keep);
  TORCH_CHECK(q.device().is_cpu(), "attention_mass: CPU kernel got q on ", q.device());
  auto outputs = attention_mass_outputs(q, p);
  if (p.batch * p.heads > 0)
    TORCH_CHECK(attention_mass_cpu(p, torch_cpu_context()), "attention_mass: invalid parameters");
  return outputs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinkdlm, m) {
  m.def(
      "attention_mass(Tensor q, Tensor k, Tensor lse, Tensor? sink_k, Tensor? sink_logit, "
      "Tensor? key_padding_mask, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sinkdlm, CPU, m) { m.impl("attention_mass", &attention_mass_cpu_impl); }

}  // namespace sinkdlm
