// Torch-free CUDA launcher for the attention-mass kernel (see csrc/analysis/attention_mass_params.h
// for the arguments and the result's meaning).
#pragma once

#include <cuda_runtime_api.h>

#include "../csrc/analysis/attention_mass_params.h"

namespace sinkdlm {

// Enqueues the kernel on `stream`; returns the launch error (cudaSuccess when fine). All pointers
// are device pointers.
cudaError_t attention_mass_cuda(const AttentionMassParams& p, cudaStream_t stream);

}  // namespace sinkdlm
