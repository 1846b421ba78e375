// Argument checks of the composed sink attention (the same rules and messages as the native
// registration's; to be replaced by struct-cpp's shared make_sink_attention_params once merged).
// The Python wrapper (sinkdlm.sink_attention) checks first, with friendlier messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace sinkdlm {

struct SinkAttentionDims {
  int64_t batch, heads, kv_heads, seq_len, head_dim;
};

inline void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "sink_attention: ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "sink_attention: ", name, " must be on ", q.device(),
              ", got ", t.device());
}

inline SinkAttentionDims check_sink_attention_args(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v,
    const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "sink_attention: q, k, v must be 4-D (B, H, L, D), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  check_like_q(k, q, "k");
  check_like_q(v, q, "v");
  const SinkAttentionDims d{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  TORCH_CHECK(k.sizes() == v.sizes(), "sink_attention: k and v must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == d.batch && k.size(2) == d.seq_len && k.size(3) == d.head_dim &&
                  d.kv_heads > 0 && d.heads % d.kv_heads == 0,
              "sink_attention: k must be (B, Hkv, L, D) with H % Hkv == 0 for q ", q.sizes(),
              ", got ", k.sizes());
  TORCH_CHECK(sink_k.has_value() == sink_v.has_value(),
              "sink_attention: sink_k and sink_v must be given together");
  if (sink_k) {
    for (const auto* s : {&*sink_k, &*sink_v}) {
      check_like_q(*s, q, "sink_k/sink_v");
      const bool ok = (s->dim() == 2 && s->size(0) == d.kv_heads && s->size(1) == d.head_dim) ||
                      (s->dim() == 3 && s->size(0) == d.batch && s->size(1) == d.kv_heads &&
                       s->size(2) == d.head_dim);
      TORCH_CHECK(ok, "sink_attention: sink_k/sink_v must be (Hkv, D) or (B, Hkv, D) = (",
                  d.kv_heads, ", ", d.head_dim, ") or (", d.batch, ", ", d.kv_heads, ", ",
                  d.head_dim, "), got ", s->sizes());
    }
    TORCH_CHECK(sink_k->sizes() == sink_v->sizes(),
                "sink_attention: sink_k and sink_v must have the same shape");
  }
  if (sink_logit) {
    TORCH_CHECK(sink_logit->dim() == 1 && sink_logit->size(0) == d.heads &&
                    at::isFloatingType(sink_logit->scalar_type()) &&
                    sink_logit->device() == q.device(),
                "sink_attention: sink_logit must be a floating (H,) = (", d.heads, ",) tensor on ",
                q.device(), ", got ", sink_logit->scalar_type(), sink_logit->sizes());
  }
  if (key_padding_mask) {
    TORCH_CHECK(
        key_padding_mask->scalar_type() == at::kBool && key_padding_mask->dim() == 2 &&
            key_padding_mask->size(0) == d.batch && key_padding_mask->size(1) == d.seq_len &&
            key_padding_mask->device() == q.device(),
        "sink_attention: key_padding_mask must be bool (B, L) = (", d.batch, ", ", d.seq_len,
        ") on ", q.device(), ", got ", key_padding_mask->scalar_type(), key_padding_mask->sizes());
  }
  return d;
}

inline void check_sink_attention_bwd_args(const SinkAttentionDims& d, const at::Tensor& grad_out,
                                          const std::optional<at::Tensor>& grad_lse,
                                          const at::Tensor& q, const at::Tensor& out,
                                          const at::Tensor& lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "sink_attention_bwd: grad_out and out must have q's shape ", q.sizes());
  check_like_q(grad_out, q, "grad_out");
  check_like_q(out, q, "out");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.batch && lse.size(1) == d.heads &&
                  lse.size(2) == d.seq_len && lse.device() == q.device(),
              "sink_attention_bwd: lse must be (B, H, L) on ", q.device(), ", got ", lse.sizes());
  if (grad_lse) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes() && grad_lse->device() == q.device(),
                "sink_attention_bwd: grad_lse must be ", lse.sizes(), " on ", q.device(), ", got ",
                grad_lse->sizes());
  }
}

}  // namespace sinkdlm
