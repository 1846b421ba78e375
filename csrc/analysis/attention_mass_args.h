// Argument checks and kernel params of sinkdlm::attention_mass, for its CPU and CUDA
// registrations (attention_mass_ops.cpp, attention_mass_ops_cuda.cpp). Torch header.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "analysis/attention_mass_params.h"

namespace sinkdlm {

// Checks the inputs against the schema's contract (raising a c10::Error that names the argument
// and what was expected) and returns the params pointing into them; the contiguous copies it
// makes are appended to `keep`, which must outlive the kernel. Outputs are not set
// (attention_mass_outputs does that).
AttentionMassParams make_attention_mass_params(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& lse,
                                               const std::optional<at::Tensor>& sink_k,
                                               const std::optional<at::Tensor>& sink_logit,
                                               const std::optional<at::Tensor>& key_padding_mask,
                                               double scale, std::vector<at::Tensor>& keep);

// Allocates the op's outputs like q: mass (B,H,L) and sink_mass (B,H), and points p at them.
std::tuple<at::Tensor, at::Tensor> attention_mass_outputs(const at::Tensor& q,
                                                          AttentionMassParams& p);

}  // namespace sinkdlm
