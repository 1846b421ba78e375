// Torch-free CPU core of the batched remasking step of a diffusion LM sampler: for every masked
// position in a row's window, one pass over the vocabulary computes the candidate token (argmax of
// logits / T + Gumbel noise, or plain argmax) together with the softmax statistics the confidence
// needs; then each row fills its most confident positions. See python/sinkdlm/remask_step.py for
// the full semantics.
#pragma once

#include <cstdint>

#include "common/cpu_context.h"
#include "remask/remask_step_params.h"

namespace sinkdlm {
namespace remask {

// Runs one remasking step. Arguments must already be validated (shapes, window inside [0, L],
// mask_id inside the vocabulary, num_transfer >= 0).
void remask_step_cpu(const RemaskStepParams& params, const CpuContext& ctx);

// The noise remask_step_cpu draws, for references and tests: gumbel (B, L, V) and the
// per-position uniform of the random strategy (B, L), both contiguous float32 (either may be null).
void remask_step_noise_cpu(uint64_t seed, uint32_t offset, int64_t batch, int64_t seq_len,
                           int64_t vocab, float* gumbel, float* uniform, const CpuContext& ctx);

}  // namespace remask
}  // namespace sinkdlm
