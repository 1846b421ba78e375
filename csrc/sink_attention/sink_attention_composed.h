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

#include "sink_attention/sink_merge_params.h"

namespace sinkdlm::composed {

// A device's merge kernels, on params whose pointers are that device's.
struct MergeKernels {
  void (*fwd)(const SinkMergeParams&);
  void (*bwd)(const SinkMergeBwdParams&);
};

// Same arguments and results as sinkdlm::sink_attention_fwd / _bwd. out, dq, dk and dv have the
// strides of empty_like(q / q / k / v): the inputs' own layout where it is dense.
std::tuple<at::Tensor, at::Tensor> sink_attention_composed_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v,
    const std::optional<at::Tensor>& sink_logit, const std::optional<at::Tensor>& key_padding_mask,
    double scale, const MergeKernels& kernels);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sink_attention_composed_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& sink_k,
                            const std::optional<at::Tensor>& sink_v,
                            const std::optional<at::Tensor>& sink_logit,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const at::Tensor& out, const at::Tensor& lse, double scale,
                            const MergeKernels& kernels);

}  // namespace sinkdlm::composed
