// Torch-free CUDA launchers that merge the sink into a stock attention's result and gradients
// (the math is in csrc/sink_attention/sink_merge_params.h; sink_merge_cpu.h is the CPU twin).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../csrc/common/half.h"
#include "../csrc/sink_attention/sink_merge_params.h"

namespace sinkdlm {

// The largest head dimension the kernels take (one warp holds a row in registers).
constexpr int64_t kSinkMergeMaxHeadDim = 256;

// Enqueues the forward merge on `stream`; returns the launch error (cudaErrorInvalidValue for a
// head dim above kSinkMergeMaxHeadDim, a non-unit last stride, or a grid too large). T is float,
// float16 or bfloat16; every pointer is a device pointer. p.out may alias p.attn_out when both
// have the same strides.
template <typename T>
cudaError_t launch_sink_merge_fwd(const SinkMergeParams<T, float>& p, cudaStream_t stream);

// Device scratch (bytes) that launch_sink_merge_bwd needs for these sizes.
size_t sink_merge_bwd_workspace_bytes(int64_t batch, int64_t heads, int64_t seq_len,
                                      int64_t head_dim);

// Enqueues the backward: dq += the sink's part, dsink_k / dsink_v / dsink_logit written. The
// per-row terms are summed per block of rows into `workspace`, then over blocks, heads and
// (for a shared sink) the batch in a fixed order: the gradients are deterministic.
template <typename T>
cudaError_t launch_sink_merge_bwd(const SinkMergeBwdParams<T, float>& p, void* workspace,
                                  cudaStream_t stream);

}  // namespace sinkdlm
