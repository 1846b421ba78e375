// Sink attention on the CPU, free of torch: raw pointers and element strides.
//
// Each query row i attends, non-causally, over [sink ; keys]:
//   s_sink = scale * q_i . sink_k            (optional sink token, value sink_v)
//   s_lam  = sink_logit[h]                   (optional logit sink, no value, not scaled)
//   s_ij   = scale * q_i . k_j               (real keys only)
//   out_i  = (e^{s_sink} sink_v + sum_j e^{s_ij} v_j) / (e^{s_sink} + e^{s_lam} + sum_j e^{s_ij})
//   lse_i  = log of that denominator.
// The sink starts each row's online softmax, so it costs no extra tile.
#pragma once

#include <cstdint>

#include "common/cpu_context.h"

namespace sinkdlm {

enum class ScalarType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Element strides of a 4-D tensor (B, H, L, D).
struct Strides4 {
  int64_t b, h, l, d;
};

struct SinkAttentionProblem {
  ScalarType dtype;
  // Lq queries attend over Lk keys (Lq != Lk: a block's queries over cached keys and their own).
  int64_t batch, heads, kv_heads, q_len, kv_len, head_dim;
  double scale;
  // q (B, H, Lq, D); k, v (B, Hkv, Lk, D): dtype, any strides.
  const void* q;
  Strides4 q_stride;
  const void* k;
  Strides4 k_stride;
  const void* v;
  Strides4 v_stride;
  // Sink token: (B or 1, Hkv, D) contiguous in the accumulation type (double for float64,
  // else float); sink_batch_stride is 0 when one sink serves the whole batch. Null: no token.
  const void* sink_k;
  const void* sink_v;
  int64_t sink_batch_stride;
  // Logit sink: (H,) in the accumulation type. Null: none.
  const void* sink_logit;
  // (B, Lk) contiguous, true = real key. Null: no padding.
  const bool* key_padding_mask;
  // (B, Lq) contiguous, true = real query; padded rows return out = 0, lse = 0. Null: none.
  const bool* query_padding_mask;
};

// out (B, H, Lq, D) contiguous in dtype; lse (B, H, Lq) contiguous in the accumulation type.
// Padded query rows, and rows that see no key at all, get out = 0 and lse = 0.
void sink_attention_fwd_cpu(const SinkAttentionProblem& p, void* out, void* lse,
                            const CpuContext& ctx);

struct SinkAttentionGrads {
  // Inputs: dout (B, H, Lq, D) any strides in dtype; out as returned by the forward (any
  // strides, dtype); lse (B, H, Lq) contiguous accumulation type; dlse optional, like lse.
  const void* dout;
  Strides4 dout_stride;
  const void* out;
  Strides4 out_stride;
  const void* lse;
  const void* dlse;
  // Outputs, contiguous: dq (B, H, Lq, D), dk, dv (B, Hkv, Lk, D) in dtype; in the accumulation
  // type dsink_k, dsink_v shaped like sink_k (null when there is no sink token) and
  // dsink_logit (H,) (null when there is no logit sink). Summed over every query that saw
  // the sink, and over the batch for a shared sink.
  void* dq;
  void* dk;
  void* dv;
  void* dsink_k;
  void* dsink_v;
  void* dsink_logit;
};

void sink_attention_bwd_cpu(const SinkAttentionProblem& p, const SinkAttentionGrads& g,
                            const CpuContext& ctx);

}  // namespace sinkdlm
