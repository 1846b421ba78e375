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
// Without a query_padding_mask the queries are padded like the keys when Lq == Lk (they are the
// same tokens), else not at all. segment_ids (packed rows) is int32 or int64 (B, L), Lq == Lk,
// non-decreasing along each row (checked on the host: a device sync on CUDA); kept as int64.
SinkAttentionParams make_sink_attention_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v,
    const std::optional<at::Tensor>& sink_logit, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask,
    const std::optional<at::Tensor>& segment_ids, double scale, std::vector<at::Tensor>& keep);

// Checks the backward's own inputs against the forward's params p (from the call above).
void check_sink_attention_bwd_args(const SinkAttentionParams& p, const at::Tensor& grad_out,
                                   const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                                   const at::Tensor& out, const at::Tensor& lse);

// The query padding in force, as a tensor (for routes that take masks as tensors rather than
// p's pointers): the given mask, else the key mask when the queries are the keys' tokens
// (Lq == Lk), else none (undefined).
inline at::Tensor query_padding_in_force(const SinkAttentionParams& p,
                                         const std::optional<at::Tensor>& key_padding_mask,
                                         const std::optional<at::Tensor>& query_padding_mask) {
  if (query_padding_mask) return query_padding_mask->contiguous();
  if (key_padding_mask && p.seq_len == p.kv_seq_len) return key_padding_mask->contiguous();
  return at::Tensor();
}

}  // namespace sinkdlm
