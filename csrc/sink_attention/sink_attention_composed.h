// Sink attention composed from ATen's fused attention and the sink merge, for any device that has
// both (sink_attention_composed_ops.cpp). Forward: the fused non-causal attention over the L real
// keys, returning its log-sum-exp, then a sinkdlm kernel folds the sink into out and lse. Backward:
// the same backend's backward fed the merged out and lse, then a sinkdlm kernel adds the sink's
// gradients (sink_merge_params.h has the math). A device supplies its merge kernels; the
// composition and the backend choice are shared.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/half.h"
#include "common/torch_interop.h"
#include "sink_attention/sink_merge_params.h"

namespace sinkdlm::composed {

// One forward merge. The sinks are contiguous in the accumulation type and row_mask is (B, Lq)
// bool contiguous (the query padding); undefined tensors are absent. attn_lse is a (B, H, Lq) view
// of the backend's.
struct MergeFwdArgs {
  int64_t kv_heads;
  at::Tensor q, attn_out, attn_lse;
  at::Tensor sink_k, sink_v, sink_logit, row_mask;
  double scale;
  at::Tensor out, lse;  // written; out may be attn_out itself
};

// One backward merge: dq is updated in place; lse, dlse contiguous in the accumulation type.
struct MergeBwdArgs {
  int64_t kv_heads;
  at::Tensor q, dout, out, lse, dlse;
  at::Tensor sink_k, sink_v, sink_logit, row_mask;
  double scale;
  at::Tensor dq;
  at::Tensor dsink_k, dsink_v, dsink_logit;  // written, contiguous accumulation type
};

// A device's merge kernels.
struct MergeKernels {
  void (*fwd)(const MergeFwdArgs&);
  void (*bwd)(const MergeBwdArgs&);
};

// Same arguments and results as sinkdlm::sink_attention_fwd / _bwd. out, dq, dk and dv have the
// strides of empty_like(q / q / k / v): the inputs' own layout where it is dense. With segment_ids
// (packed rows) the CPU's fused kernel takes a dense (B, 1, L, L) bias (O(L^2) memory: ATen's CPU
// flash has no varlen form) and CUDA runs flash attention's varlen form (float16/bfloat16; float32
// the dense bias too).
std::tuple<at::Tensor, at::Tensor> sink_attention_composed_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v,
    const std::optional<at::Tensor>& sink_logit, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, double scale,
    const std::optional<at::Tensor>& segment_ids, const MergeKernels& kernels);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sink_attention_composed_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& sink_k,
                            const std::optional<at::Tensor>& sink_v,
                            const std::optional<at::Tensor>& sink_logit,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& query_padding_mask,
                            const at::Tensor& out, const at::Tensor& lse, double scale,
                            const std::optional<at::Tensor>& segment_ids,
                            const MergeKernels& kernels);

// ---- helpers for a device's merge kernels ------------------------------------------------

// Calls fn.template operator()<T, A>() with T the storage type of `dtype` (float, double,
// float16, bfloat16) and A its accumulation type.
template <typename Fn>
void dispatch_storage_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn.template operator()<float, float>();
    case at::kDouble:
      return fn.template operator()<double, double>();
    case at::kHalf:
      return fn.template operator()<float16, float>();
    case at::kBFloat16:
      return fn.template operator()<bfloat16, float>();
    default:
      TORCH_CHECK_TYPE(
          false, "sink_attention: q must be float32, float64, float16 or bfloat16, got ", dtype);
  }
}

template <typename T>
T* data_of(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename T, typename A>
SinkMergeParams<T, A> make_sink_merge_params(const MergeFwdArgs& a) {
  SinkMergeParams<T, A> p{};
  p.batch = a.q.size(0), p.heads = a.q.size(1), p.seq_len = a.q.size(2), p.head_dim = a.q.size(3);
  p.kv_heads = a.kv_heads;
  p.scale = static_cast<A>(a.scale);
  p.q = data_of<const T>(a.q), p.q_stride = strides4(a.q);
  p.attn_out = data_of<const T>(a.attn_out), p.attn_out_stride = strides4(a.attn_out);
  p.attn_lse = data_of<const A>(a.attn_lse), p.attn_lse_stride = strides3(a.attn_lse);
  p.sink_k = data_of<const A>(a.sink_k), p.sink_v = data_of<const A>(a.sink_v);
  p.sink_batch_stride = a.sink_k.defined() && a.sink_k.dim() == 3 ? a.sink_k.stride(0) : 0;
  p.sink_logit = data_of<const A>(a.sink_logit);
  p.row_mask = data_of<const bool>(a.row_mask);
  p.out = data_of<T>(a.out), p.out_stride = strides4(a.out);
  p.lse = data_of<A>(a.lse);
  return p;
}

template <typename T, typename A>
SinkMergeBwdParams<T, A> make_sink_merge_bwd_params(const MergeBwdArgs& a) {
  SinkMergeBwdParams<T, A> p{};
  p.batch = a.q.size(0), p.heads = a.q.size(1), p.seq_len = a.q.size(2), p.head_dim = a.q.size(3);
  p.kv_heads = a.kv_heads;
  p.scale = static_cast<A>(a.scale);
  p.q = data_of<const T>(a.q), p.q_stride = strides4(a.q);
  p.dout = data_of<const T>(a.dout), p.dout_stride = strides4(a.dout);
  p.out = data_of<const T>(a.out), p.out_stride = strides4(a.out);
  p.lse = data_of<const A>(a.lse), p.dlse = data_of<const A>(a.dlse);
  p.sink_k = data_of<const A>(a.sink_k), p.sink_v = data_of<const A>(a.sink_v);
  p.sink_batch_stride = a.sink_k.defined() && a.sink_k.dim() == 3 ? a.sink_k.stride(0) : 0;
  p.sink_logit = data_of<const A>(a.sink_logit);
  p.row_mask = data_of<const bool>(a.row_mask);
  p.dq = data_of<T>(a.dq), p.dq_stride = strides4(a.dq);
  p.dsink_k = data_of<A>(a.dsink_k), p.dsink_v = data_of<A>(a.dsink_v);
  p.dsink_logit = data_of<A>(a.dsink_logit);
  return p;
}

}  // namespace sinkdlm::composed
