// Argument checks and kernel params of sinkdlm::remask_step, for its CPU and CUDA registrations
// (remask_step_ops.cpp, remask_step_ops_cuda.cpp). Torch header.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "remask/remask_step_params.h"

namespace sinkdlm {
namespace remask {

// Checks the inputs (raising a c10::Error that names the argument and what was expected) and
// returns the params pointing into them; the contiguous copies it makes are appended to `keep`,
// which must outlive the kernel. Outputs are not set (remask_step_outputs does that).
RemaskStepParams make_remask_step_params(const at::Tensor& logits, const at::Tensor& x,
                                         int64_t mask_id, const at::Tensor& num_transfer,
                                         const std::optional<at::Tensor>& window,
                                         const std::string& strategy, double temperature,
                                         std::optional<double> threshold, int64_t seed,
                                         int64_t offset, std::vector<at::Tensor>& keep);

// Allocates the op's outputs like x (B, L): x_new int64, transferred bool, confidence float32,
// and points p at them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> remask_step_outputs(const at::Tensor& x,
                                                                   RemaskStepParams& p);

// After the kernels ran: raises a ValueError when a position to fill had NaN logits or none above
// -inf (the kernels mark it with a NaN confidence). Reads one flag on the host (a sync on CUDA).
void check_defined_distributions(const at::Tensor& confidence);

}  // namespace remask
}  // namespace sinkdlm
