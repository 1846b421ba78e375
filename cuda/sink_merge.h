// Torch-free CUDA launchers that merge the sink into a stock attention's result and gradients
// (csrc/sink_attention/sink_merge_params.h has the arguments and the math; sink_merge_cpu.h is the
// CPU twin).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../csrc/sink_attention/sink_merge_params.h"

namespace sinkdlm {

// The largest head dimension the kernels take (a warp holds a row in registers).
constexpr int64_t kSinkMergeMaxHeadDim = 256;

// Enqueues the forward merge on `stream`; returns the launch error, or cudaErrorInvalidValue for
// float64, a head dim above kSinkMergeMaxHeadDim, a non-unit last stride or a grid too large.
// Every pointer is a device pointer.
cudaError_t launch_sink_merge_fwd(const SinkMergeParams& p, cudaStream_t stream);

// Device scratch (bytes) that launch_sink_merge_bwd needs for p's sizes.
size_t sink_merge_bwd_workspace_bytes(const SinkMergeBwdParams& p);

// Enqueues the backward: dq += the sink's part, dsink_k / dsink_v / dsink_logit written. The
// per-row terms are summed per block of rows into `workspace`, then over blocks, heads and (for a
// shared sink) the batch in a fixed order: the gradients are deterministic.
cudaError_t launch_sink_merge_bwd(const SinkMergeBwdParams& p, void* workspace,
                                  cudaStream_t stream);

}  // namespace sinkdlm
