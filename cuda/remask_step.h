// Torch-free CUDA launcher of the batched remasking step (see csrc/remask/remask_step_cpu.h for
// the semantics; both backends share the parameters, the ranking key and the Philox noise).
#pragma once

#include <cuda_runtime.h>

#include "../csrc/remask/remask_step_params.h"

namespace sinkdlm {
namespace remask {

// Runs one step on `stream`. Every pointer in `params` is a device pointer; arguments must
// already be validated. Returns the first CUDA error (launches are checked), cudaSuccess otherwise.
cudaError_t remask_step_cuda(const RemaskStepParams& params, cudaStream_t stream);

}  // namespace remask
}  // namespace sinkdlm
