// torch.ops.sinkdlm.sink_attention_{fwd,bwd}: schema, argument checks and the CPU impl.
// The Python wrapper (sinkdlm/sink_attention.py) validates arguments with friendlier
// messages and adds autograd and fake kernels; these checks guard direct callers of the op.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "common/torch_interop.h"
#include "sink_attention/sink_attention_args.h"
#include "sink_attention/sink_attention_cpu.h"

namespace sinkdlm {
namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_same(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "sink_attention: ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "sink_attention: ", name, " must be on ", q.device(),
              ", got ", t.device());
}

}  // namespace

SinkAttentionParams make_sink_attention_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v,
    const std::optional<at::Tensor>& sink_logit, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask,
    const std::optional<at::Tensor>& segment_ids, double scale, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "sink_attention: q, k, v must be 4-D (B, H, L, D), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  check_same(k, q, "k");
  check_same(v, q, "v");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), "sink_attention: k and v must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "sink_attention: k must be (B, Hkv, Lk, D) with H % Hkv == 0 for q ", q.sizes(),
              ", got ", k.sizes());
  const at::ScalarType dtype = q.scalar_type(), acc = acc_type(dtype);
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "sink_attention: q must be float32, float64, float16 or bfloat16, got ", dtype);
  SinkAttentionParams p;
  p.dtype = kernel_dtype(dtype);
  p.batch = B, p.heads = H, p.kv_heads = Hkv, p.seq_len = Lq, p.kv_seq_len = Lk, p.head_dim = D;
  p.scale = scale;
  p.q = q.data_ptr(), p.q_stride = strides4(q);
  p.k = k.data_ptr(), p.k_stride = strides4(k);
  p.v = v.data_ptr(), p.v_stride = strides4(v);
  TORCH_CHECK(sink_k.has_value() == sink_v.has_value(),
              "sink_attention: sink_k and sink_v must be given together");
  if (sink_k) {
    for (const auto* s : {&*sink_k, &*sink_v}) {
      check_same(*s, q, "sink_k/sink_v");
      const bool ok = (s->dim() == 2 && s->size(0) == Hkv && s->size(1) == D) ||
                      (s->dim() == 3 && s->size(0) == B && s->size(1) == Hkv && s->size(2) == D);
      TORCH_CHECK(ok, "sink_attention: sink_k/sink_v must be (Hkv, D) or (B, Hkv, D) = (", Hkv,
                  ", ", D, ") or (", B, ", ", Hkv, ", ", D, "), got ", s->sizes());
    }
    TORCH_CHECK(sink_k->sizes() == sink_v->sizes(),
                "sink_attention: sink_k and sink_v must have the same shape");
    keep.push_back(sink_k->to(acc).contiguous());
    keep.push_back(sink_v->to(acc).contiguous());
    p.sink_k = keep[keep.size() - 2].data_ptr();
    p.sink_v = keep.back().data_ptr();
    p.sink_batch_stride = sink_k->dim() == 3 ? Hkv * D : 0;
  }
  if (sink_logit) {
    TORCH_CHECK(sink_logit->dim() == 1 && sink_logit->size(0) == H &&
                    at::isFloatingType(sink_logit->scalar_type()) &&
                    sink_logit->device() == q.device(),
                "sink_attention: sink_logit must be a floating (H,) = (", H, ",) tensor on ",
                q.device(), ", got ", sink_logit->scalar_type(), sink_logit->sizes());
    keep.push_back(sink_logit->to(acc).contiguous());
    p.sink_logit = keep.back().data_ptr();
  }
  // Padding masks, bool (B, length) on q's device; returns the contiguous data or null.
  const auto padding = [&](const std::optional<at::Tensor>& mask, int64_t length,
                           const char* name) -> const bool* {
    if (!mask) return nullptr;
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == B &&
                    mask->size(1) == length && mask->device() == q.device(),
                "sink_attention: ", name, " must be bool (B, ", length, ") = (", B, ", ", length,
                ") on ", q.device(), ", got ", mask->scalar_type(), mask->sizes());
    keep.push_back(mask->contiguous());
    return keep.back().data_ptr<bool>();
  };
  p.key_padding_mask = padding(key_padding_mask, Lk, "key_padding_mask");
  p.query_padding_mask = query_padding_mask ? padding(query_padding_mask, Lq, "query_padding_mask")
                         : Lq == Lk         ? p.key_padding_mask
                                            : nullptr;
  if (segment_ids) {
    const at::Tensor& seg = *segment_ids;
    TORCH_CHECK_TYPE(seg.scalar_type() == at::kLong || seg.scalar_type() == at::kInt,
                     "sink_attention: segment_ids must be int32 or int64, got ", seg.scalar_type());
    TORCH_CHECK(Lq == Lk, "sink_attention: segment_ids needs as many queries as keys (the same ",
                "tokens), got Lq = ", Lq, " and Lk = ", Lk);
    TORCH_CHECK(
        seg.dim() == 2 && seg.size(0) == B && seg.size(1) == Lq && seg.device() == q.device(),
        "sink_attention: segment_ids must be (B, L) = (", B, ", ", Lq, ") on ", q.device(),
        ", got ", seg.sizes(), " on ", seg.device());
    keep.push_back(seg.to(at::kLong).contiguous());
    const at::Tensor& ids = keep.back();
    TORCH_CHECK(Lq < 2 || !ids.narrow(1, 1, Lq - 1).lt(ids.narrow(1, 0, Lq - 1)).any().item<bool>(),
                "sink_attention: segment_ids must be non-decreasing along each row (one run of ",
                "equal ids per document)");
    p.segment_ids = ids.data_ptr<int64_t>();
  }
  return p;
}

void check_sink_attention_bwd_args(const SinkAttentionParams& p, const at::Tensor& grad_out,
                                   const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                                   const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "sink_attention_bwd: grad_out and out must have q's shape ", q.sizes());
  check_same(grad_out, q, "grad_out");
  check_same(out, q, "out");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.batch && lse.size(1) == p.heads &&
                  lse.size(2) == p.seq_len && lse.device() == q.device(),
              "sink_attention_bwd: lse must be (B, H, L) on ", q.device(), ", got ", lse.sizes());
  if (grad_lse) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes() && grad_lse->device() == q.device(),
                "sink_attention_bwd: grad_lse must be ", lse.sizes(), " on ", q.device(), ", got ",
                grad_lse->sizes());
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor> sink_attention_fwd_cpu_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v,
    const std::optional<at::Tensor>& sink_logit, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, double scale,
    const std::optional<at::Tensor>& segment_ids) {
  std::vector<at::Tensor> keep;
  SinkAttentionParams p =
      make_sink_attention_params(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask,
                                 query_padding_mask, segment_ids, scale, keep);
  // out takes q's layout, as SDPA's does: for a (B, L, H, D) projection viewed as heads the
  // caller's transpose back to (B, L, H * D) is then free (no second copy kept per layer).
  at::Tensor out = at::empty_like(q);
  at::Tensor lse =
      at::empty({p.batch, p.heads, p.seq_len}, q.options().dtype(acc_type(q.scalar_type())));
  p.out = out.data_ptr(), p.out_stride = strides4(out);
  p.lse = lse.data_ptr();
  if (out.numel() > 0) sink_attention_fwd_cpu(p, torch_cpu_context());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sink_attention_bwd_cpu_impl(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& sink_k,
                            const std::optional<at::Tensor>& sink_v,
                            const std::optional<at::Tensor>& sink_logit,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& query_padding_mask,
                            const at::Tensor& out, const at::Tensor& lse, double scale,
                            const std::optional<at::Tensor>& segment_ids) {
  std::vector<at::Tensor> keep;
  SinkAttentionBwdParams p{make_sink_attention_params(q, k, v, sink_k, sink_v, sink_logit,
                                                      key_padding_mask, query_padding_mask,
                                                      segment_ids, scale, keep)};
  const at::ScalarType acc = acc_type(q.scalar_type());
  check_sink_attention_bwd_args(p, grad_out, grad_lse, q, out, lse);
  const at::Tensor lse_acc = lse.to(acc).contiguous();
  const at::Tensor dlse_acc = grad_lse ? grad_lse->to(acc).contiguous() : at::Tensor();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const auto acc_opts = q.options().dtype(acc);
  at::Tensor dsink_k = sink_k ? at::empty(sink_k->sizes(), acc_opts) : at::empty({0}, q.options());
  at::Tensor dsink_v = sink_v ? at::empty(sink_v->sizes(), acc_opts) : at::empty({0}, q.options());
  at::Tensor dsink_logit =
      sink_logit ? at::empty({p.heads}, acc_opts) : at::empty({0}, q.options());
  if (q.numel() > 0) {
    p.out = out.data_ptr(), p.out_stride = strides4(out);
    p.lse = lse_acc.data_ptr();
    p.dout = grad_out.data_ptr(), p.dout_stride = strides4(grad_out);
    p.dlse = grad_lse ? dlse_acc.data_ptr() : nullptr;
    p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
    p.dsink_k = sink_k ? dsink_k.data_ptr() : nullptr;
    p.dsink_v = sink_v ? dsink_v.data_ptr() : nullptr;
    p.dsink_logit = sink_logit ? dsink_logit.data_ptr() : nullptr;
    sink_attention_bwd_cpu(p, torch_cpu_context());
  } else {
    dq.zero_(), dk.zero_(), dv.zero_(), dsink_k.zero_(), dsink_v.zero_(), dsink_logit.zero_();
  }
  if (sink_k) {
    dsink_k = dsink_k.to(sink_k->scalar_type());
    dsink_v = dsink_v.to(sink_v->scalar_type());
  }
  if (sink_logit) dsink_logit = dsink_logit.to(sink_logit->scalar_type());
  return {dq, dk, dv, dsink_k, dsink_v, dsink_logit};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinkdlm, m) {
  m.def(
      "sink_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? sink_k, Tensor? sink_v, "
      "Tensor? sink_logit, Tensor? key_padding_mask, Tensor? query_padding_mask, float scale, "
      "Tensor? segment_ids=None) -> (Tensor out, Tensor lse)");
  m.def(
      "sink_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor? sink_k, Tensor? sink_v, Tensor? sink_logit, Tensor? key_padding_mask, "
      "Tensor? query_padding_mask, Tensor out, Tensor lse, float scale, Tensor? segment_ids=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dsink_k, Tensor dsink_v, Tensor dsink_logit)");
}

TORCH_LIBRARY_IMPL(sinkdlm, CPU, m) {
  m.impl("sink_attention_fwd", &sink_attention_fwd_cpu_impl);
  m.impl("sink_attention_bwd", &sink_attention_bwd_cpu_impl);
}

}  // namespace sinkdlm
