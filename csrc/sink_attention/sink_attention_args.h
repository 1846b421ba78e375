// Argument checks and kernel params of sinkdlm::sink_attention_{fwd,bwd}, for their
// registrations (sink_attention_ops.cpp, and any other device's). Torch header.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "sink_attention/sink_attention_params.h"

namespace sinkdlm {

// Checks the inputs (raising a c10::Error that names the argument and what was expected) and
// returns the params pointing into them, the sinks converted to the accumulation type; the
// converted copies are appended to `keep`, which must outlive the kernel. Outputs are not set.
SinkAttentionParams make_sink_attention_params(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v,
                                               const std::optional<at::Tensor>& sink_k,
                                               const std::optional<at::Tensor>& sink_v,
                                               const std::optional<at::Tensor>& sink_logit,
                                               const std::optional<at::Tensor>& key_padding_mask,
                                               double scale, std::vector<at::Tensor>& keep);

// Checks the backward's own inputs against the forward's params p (from the call above).
void check_sink_attention_bwd_args(const SinkAttentionParams& p, const at::Tensor& grad_out,
                                   const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                                   const at::Tensor& out, const at::Tensor& lse);

}  // namespace sinkdlm
