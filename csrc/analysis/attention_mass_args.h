// Argument checks and kernel-parameter setup shared by the CPU and CUDA registrations of
// sinkdlm::attention_mass (attention_mass_ops.cpp, attention_mass_ops_cuda.cpp). Torch header.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "analysis/attention_mass_params.h"

namespace sinkdlm {

// Validates the arguments against the schema's contract and returns sink_k expanded to (B,Hkv,D)
// (undefined when absent).
inline at::Tensor check_attention_mass_args(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& lse,
                                            const std::optional<at::Tensor>& sink_k,
                                            const std::optional<at::Tensor>& sink_logit,
                                            const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4, "attention_mass: q must be (B,H,L,D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "attention_mass: k must be (B,Hkv,L,D), got ", k.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(2) == L && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "attention_mass: k must be (B,Hkv,L,D) with H % Hkv == 0 for q ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "attention_mass: q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && lse.scalar_type() == q.scalar_type(),
              "attention_mass: k and lse must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type(), " and ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == L,
              "attention_mass: lse must be (B,H,L) = (", B, ",", H, ",", L, "), got ", lse.sizes());
  std::vector<const at::Tensor*> all = {&k, &lse};
  at::Tensor sk;
  if (sink_k.has_value()) {
    sk = *sink_k;
    TORCH_CHECK(sk.scalar_type() == q.scalar_type(), "attention_mass: sink_k dtype must be ",
                q.scalar_type(), ", got ", sk.scalar_type());
    if (sk.dim() == 2) sk = sk.unsqueeze(0).expand({B, sk.size(0), sk.size(1)});
    TORCH_CHECK(sk.dim() == 3 && sk.size(0) == B && sk.size(1) == Hkv && sk.size(2) == D,
                "attention_mass: sink_k must be (Hkv,D) or (B,Hkv,D), got ", sink_k->sizes());
    all.push_back(&*sink_k);
  }
  if (sink_logit.has_value()) {
    TORCH_CHECK(sink_logit->dim() == 1 && sink_logit->size(0) == H &&
                    sink_logit->scalar_type() == q.scalar_type(),
                "attention_mass: sink_logit must be (H,) of dtype ", q.scalar_type(), ", got ",
                sink_logit->sizes(), " ", sink_logit->scalar_type());
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
  return sk;
}

// Kernel parameters pointing into the (already checked) tensors and the outputs.
template <typename T>
AttentionMassParams<T> attention_mass_params(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& lse, const at::Tensor& sink_k,
                                             const std::optional<at::Tensor>& sink_logit,
                                             const std::optional<at::Tensor>& key_padding_mask,
                                             double scale, at::Tensor& mass,
                                             at::Tensor& sink_mass) {
  AttentionMassParams<T> p;
  p.q = q.const_data_ptr<T>();
  p.k = k.const_data_ptr<T>();
  p.lse = lse.const_data_ptr<T>();
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
  }
  for (int i = 0; i < 3; ++i) p.lse_stride[i] = lse.stride(i);
  if (sink_k.defined()) {
    p.sink_k = sink_k.const_data_ptr<T>();
    for (int i = 0; i < 3; ++i) p.sink_k_stride[i] = sink_k.stride(i);
  }
  if (sink_logit.has_value()) {
    p.sink_logit = sink_logit->const_data_ptr<T>();
    p.sink_logit_stride = sink_logit->stride(0);
  }
  if (key_padding_mask.has_value()) {
    p.key_padding_mask = key_padding_mask->const_data_ptr<bool>();
    p.mask_stride[0] = key_padding_mask->stride(0);
    p.mask_stride[1] = key_padding_mask->stride(1);
  }
  p.mass = mass.mutable_data_ptr<T>();
  p.sink_mass = sink_mass.mutable_data_ptr<T>();
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.seq_len = q.size(2);
  p.head_dim = q.size(3);
  p.scale = scale;
  return p;
}

}  // namespace sinkdlm
