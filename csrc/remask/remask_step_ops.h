// Argument checking shared by the CPU and CUDA registrations of sinkdlm::remask_step.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

#include "remask/remask_step_params.h"

namespace sinkdlm {
namespace remask {

// One checked call of sinkdlm::remask_step: `params` points into the tensors held here, so
// keep the struct alive while a kernel runs.
struct RemaskStepCall {
  RemaskStepParams params;
  at::Tensor logits;        // the input, or a copy when its vocabulary dimension was strided
  at::Tensor num_transfer;  // contiguous
  at::Tensor window;        // contiguous, or undefined
  at::Tensor x_new, transferred, confidence;  // outputs, allocated like x
};

// Validates the arguments (raising a c10::Error that names the argument and what was expected),
// allocates the outputs and fills `params`. Shared by the CPU and CUDA registrations.
RemaskStepCall prepare_remask_step(const at::Tensor& logits, const at::Tensor& x, int64_t mask_id,
                                   const at::Tensor& num_transfer,
                                   const std::optional<at::Tensor>& window,
                                   const std::string& strategy, double temperature,
                                   std::optional<double> threshold, int64_t seed, int64_t offset);

// After the kernels ran: raises a ValueError when a position to fill had NaN logits or none above
// -inf (the kernels mark it with a NaN confidence). Reads one flag on the host (a sync on CUDA).
void check_defined_distributions(const RemaskStepCall& call);

}  // namespace remask
}  // namespace sinkdlm
