// Argument checking shared by the CPU and CUDA registrations of sinkdlm::remask_step.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

#include "remask/remask_step_params.h"

namespace sinkdlm {
namespace remask {

// Validates the arguments (raising a c10::Error that names the argument and what was expected)
// and fills `params` apart from the output pointers. `logits_vocab_contiguous` is logits itself
// or, when its last dimension was strided, a contiguous copy kept alive by the caller; `window`
// is made contiguous the same way.
void check_remask_step_args(const at::Tensor& logits, const at::Tensor& x, int64_t mask_id,
                            const at::Tensor& num_transfer, const std::optional<at::Tensor>& window,
                            const std::string& strategy, double temperature,
                            std::optional<double> threshold, int64_t seed, int64_t offset,
                            at::Tensor& logits_vocab_contiguous, at::Tensor& window_contiguous,
                            RemaskStepParams& params);

}  // namespace remask
}  // namespace sinkdlm
