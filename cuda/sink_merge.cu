// The sink merged into a stock attention's result (CUDA). One warp owns one query row: the lanes
// split the head dimension, a warp reduction gives q.sink_k (and, backward, rowsum(dO * out') and
// dO.sink_v), so a row costs one read of q and out (and dO) and one write. The backward's sink
// gradients are summed per block of kRowsPerBlock rows (warps in a fixed order) into a workspace,
// then over blocks, heads and the batch by a second kernel in a fixed order: deterministic.
#include <cmath>

#include "common.cuh"
#include "sink_merge.h"

namespace sinkdlm {
namespace {

using device::kWarpSize;
using device::warp_sum;

constexpr int kWarps = 8;  // rows in flight per block
constexpr int kPerLane = static_cast<int>(kSinkMergeMaxHeadDim) / kWarpSize;
constexpr int64_t kRowsPerBlock = 64;  // backward: rows per partial sum
constexpr int kReduceThreads = 128;

// Row i of head (b, h) of a (B, H, L, D) tensor of storage type S.
template <typename S>
__device__ __forceinline__ S* row(const void* x, const Strides4& st, int64_t b, int64_t h,
                                  int64_t i) {
  return static_cast<S*>(const_cast<void*>(x)) + b * st.b + h * st.h + i * st.l;
}

// grid (ceil(L / kWarps), H, B); warp w of block x handles row x * kWarps + w.
template <ScalarType kType>
__global__ void __launch_bounds__(kWarpSize* kWarps)
    sink_merge_fwd_kernel(const SinkMergeParams p) {
  using E = device::Element<kType>;
  using S = typename E::Storage;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t h = blockIdx.y, b = blockIdx.z, L = p.seq_len, D = p.head_dim;
  if (i >= L) return;  // warp-uniform
  S* o = row<S>(p.out, p.out_stride, b, h, i);
  const int64_t r = (b * p.heads + h) * L + i;
  float* lse_out = static_cast<float*>(p.lse) + r;
  if (p.key_padding_mask != nullptr && !p.key_padding_mask[b * L + i]) {
    for (int64_t d = lane; d < D; d += kWarpSize) o[d] = E::from_float(0.f);
    if (lane == 0) *lse_out = 0.f;
    return;
  }
  const int64_t hk = h / (p.heads / p.kv_heads);
  const int64_t sink_offset = b * p.sink_batch_stride + hk * D;
  const float* sink_k = static_cast<const float*>(p.sink_k);
  const float* sink_v = static_cast<const float*>(p.sink_v);
  const float* sink_logit = static_cast<const float*>(p.sink_logit);
  const S* qi = row<const S>(p.q, p.q_stride, b, h, i);
  float s = -INFINITY;
  if (sink_k != nullptr) {
    float part = 0.f;
    for (int64_t d = lane; d < D; d += kWarpSize)
      part += E::to_float(qi[d]) * sink_k[sink_offset + d];
    s = static_cast<float>(p.scale) * warp_sum(part);
  }
  const float lam = sink_logit != nullptr ? sink_logit[h] : -INFINITY;
  const float lse_tok = static_cast<const float*>(p.attn_lse)[r];
  const float m = fmaxf(lse_tok, fmaxf(s, lam));
  const float lse = m + logf(expf(lse_tok - m) + expf(s - m) + expf(lam - m));
  const float w_tok = expf(lse_tok - lse);
  const float w_sink = sink_v != nullptr ? expf(s - lse) : 0.f;
  const S* ai = row<const S>(p.attn_out, p.attn_out_stride, b, h, i);
  for (int64_t d = lane; d < D; d += kWarpSize) {
    float x = E::to_float(ai[d]) * w_tok;  // read before the write: o may alias ai
    if (sink_v != nullptr) x += w_sink * sink_v[sink_offset + d];
    o[d] = E::from_float(x);
  }
  if (lane == 0) *lse_out = lse;
}

// grid (ceil(L / kRowsPerBlock), H, B). Writes one partial per block:
// part_k / part_v [(b * H + h) * blocks + block][D], part_logit [(b * H + h) * blocks + block].
template <ScalarType kType>
__global__ void __launch_bounds__(kWarpSize* kWarps)
    sink_grad_rows_kernel(const SinkMergeBwdParams p, float* part_k, float* part_v,
                          float* part_logit) {
  using E = device::Element<kType>;
  using S = typename E::Storage;
  __shared__ float red_k[kWarps][kSinkMergeMaxHeadDim];
  __shared__ float red_v[kWarps][kSinkMergeMaxHeadDim];
  __shared__ float red_logit[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t L = p.seq_len, D = p.head_dim, bh = b * p.heads + h;
  const int64_t hk = h / (p.heads / p.kv_heads);
  const float scale = static_cast<float>(p.scale);
  const float* lse_in = static_cast<const float*>(p.lse);
  const float* dlse = static_cast<const float*>(p.dlse);
  const float* sink_logit = static_cast<const float*>(p.sink_logit);
  const bool token = p.sink_k != nullptr;
  const int64_t sink_offset = b * p.sink_batch_stride + hk * D;
  const float* sk = token ? static_cast<const float*>(p.sink_k) + sink_offset : nullptr;
  const float* sv = token ? static_cast<const float*>(p.sink_v) + sink_offset : nullptr;
  float acc_k[kPerLane] = {}, acc_v[kPerLane] = {};
  float acc_logit = 0.f;
  const int64_t i_end = min(L, (block + 1) * kRowsPerBlock);
  for (int64_t i = block * kRowsPerBlock + warp; i < i_end; i += kWarps) {
    if (p.key_padding_mask != nullptr && !p.key_padding_mask[b * L + i]) continue;  // uniform
    const S* qi = row<const S>(p.q, p.q_stride, b, h, i);
    const S* doi = row<const S>(p.dout, p.dout_stride, b, h, i);
    const S* oi = row<const S>(p.out, p.out_stride, b, h, i);
    float dov[kPerLane], qv[kPerLane];
    float delta = 0.f, do_sv = 0.f, q_sk = 0.f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int64_t d = lane + c * kWarpSize;
      dov[c] = qv[c] = 0.f;
      if (d < D) {
        dov[c] = E::to_float(doi[d]);
        delta += dov[c] * E::to_float(oi[d]);
        if (token) {
          qv[c] = E::to_float(qi[d]);
          do_sv += dov[c] * sv[d];
          q_sk += qv[c] * sk[d];
        }
      }
    }
    delta = warp_sum(delta);
    const float lse = lse_in[bh * L + i];
    const float g = dlse != nullptr ? dlse[bh * L + i] : 0.f;
    if (token) {
      const float prob = expf(scale * warp_sum(q_sk) - lse);
      const float ds = prob * (warp_sum(do_sv) - delta + g);
      S* dqi = row<S>(p.dq, p.dq_stride, b, h, i);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int64_t d = lane + c * kWarpSize;
        if (d < D) {
          acc_v[c] += prob * dov[c];
          acc_k[c] += scale * ds * qv[c];
          dqi[d] = E::from_float(E::to_float(dqi[d]) + scale * ds * sk[d]);
        }
      }
    }
    if (sink_logit != nullptr) acc_logit += expf(sink_logit[h] - lse) * (g - delta);
  }
  if (token) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int64_t d = lane + c * kWarpSize;
      if (d < D) {
        red_k[warp][d] = acc_k[c];
        red_v[warp][d] = acc_v[c];
      }
    }
  }
  if (lane == 0) red_logit[warp] = acc_logit;
  __syncthreads();
  const int64_t slot = bh * gridDim.x + block;
  if (token) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float k = 0.f, v = 0.f;
      for (int w = 0; w < kWarps; ++w) {
        k += red_k[w][d];
        v += red_v[w][d];
      }
      part_k[slot * D + d] = k;
      part_v[slot * D + d] = v;
    }
  }
  if (sink_logit != nullptr && threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += red_logit[w];
    part_logit[slot] = s;
  }
}
// One block per output sink row o (hk for a shared sink, b * Hkv + hk per batch).
__global__ void __launch_bounds__(kReduceThreads)
    sink_grad_reduce_kernel(int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                            int64_t blocks, bool shared, const float* part_k, const float* part_v,
                            float* dsink_k, float* dsink_v) {
  const int64_t o = blockIdx.x, hk = o % kv_heads, group = heads / kv_heads;
  const int64_t b_begin = shared ? 0 : o / kv_heads, b_end = shared ? batch : b_begin + 1;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float k = 0.f, v = 0.f;
    for (int64_t b = b_begin; b < b_end; ++b)
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t slot = (b * heads + h) * blocks + blk;
          k += part_k[slot * head_dim + d];
          v += part_v[slot * head_dim + d];
        }
    dsink_k[o * head_dim + d] = k;
    dsink_v[o * head_dim + d] = v;
  }
}

__global__ void __launch_bounds__(kReduceThreads)
    sink_logit_reduce_kernel(int64_t batch, int64_t heads, int64_t blocks, const float* part_logit,
                             float* dsink_logit) {
  for (int64_t h = threadIdx.x; h < heads; h += blockDim.x) {
    float s = 0.f;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t blk = 0; blk < blocks; ++blk) s += part_logit[(b * heads + h) * blocks + blk];
    dsink_logit[h] = s;
  }
}

int64_t row_blocks(int64_t seq_len) { return (seq_len + kRowsPerBlock - 1) / kRowsPerBlock; }

bool supported(const SinkAttentionParams& p) {
  return p.dtype != ScalarType::kFloat64 && p.batch <= 65535 && p.heads <= 65535 &&
         p.kv_heads > 0 && p.heads % p.kv_heads == 0 && p.head_dim > 0 &&
         p.head_dim <= kSinkMergeMaxHeadDim && p.q_stride.d == 1;
}

template <ScalarType kType>
struct LaunchFwd {
  static cudaError_t run(const SinkMergeParams& p, dim3 grid, cudaStream_t stream) {
    sink_merge_fwd_kernel<kType><<<grid, kWarpSize * kWarps, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

template <ScalarType kType>
struct LaunchGradRows {
  static cudaError_t run(const SinkMergeBwdParams& p, dim3 grid, cudaStream_t stream, float* part_k,
                         float* part_v, float* part_logit) {
    sink_grad_rows_kernel<kType>
        <<<grid, kWarpSize * kWarps, 0, stream>>>(p, part_k, part_v, part_logit);
    return cudaGetLastError();
  }
};

// Fn<kType>::run(args...) for the float types the kernels take (no float64).
template <template <ScalarType> class Fn, typename... Args>
cudaError_t dispatch(ScalarType t, Args&&... args) {
  switch (t) {
    case ScalarType::kFloat32:
      return Fn<ScalarType::kFloat32>::run(args...);
    case ScalarType::kFloat16:
      return Fn<ScalarType::kFloat16>::run(args...);
    case ScalarType::kBFloat16:
      return Fn<ScalarType::kBFloat16>::run(args...);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_sink_merge_fwd(const SinkMergeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seq_len == 0) return cudaSuccess;
  if (!supported(p) || p.attn_out_stride.d != 1 || p.out_stride.d != 1)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((p.seq_len + kWarps - 1) / kWarps),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  return dispatch<LaunchFwd>(p.dtype, p, grid, stream);
}

size_t sink_merge_bwd_workspace_bytes(const SinkMergeBwdParams& p) {
  const int64_t slots = p.batch * p.heads * row_blocks(p.seq_len);
  return sizeof(float) * static_cast<size_t>(slots * (2 * p.head_dim + 1));
}

cudaError_t launch_sink_merge_bwd(const SinkMergeBwdParams& p, void* workspace,
                                  cudaStream_t stream) {
  const bool token = p.sink_k != nullptr, logit = p.sink_logit != nullptr;
  if (!token && !logit) return cudaSuccess;
  if (!supported(p) || p.dout_stride.d != 1 || p.out_stride.d != 1 || p.dq_stride.d != 1)
    return cudaErrorInvalidValue;
  const int64_t blocks = row_blocks(p.seq_len);
  const int64_t slots = p.batch * p.heads * blocks;
  float* part_k = static_cast<float*>(workspace);
  float* part_v = part_k + slots * p.head_dim;
  float* part_logit = part_v + slots * p.head_dim;
  if (slots > 0) {
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.heads),
                    static_cast<unsigned>(p.batch));
    const cudaError_t err =
        dispatch<LaunchGradRows>(p.dtype, p, grid, stream, part_k, part_v, part_logit);
    if (err != cudaSuccess) return err;
  }
  if (token) {
    const bool shared = p.sink_batch_stride == 0;
    const int64_t outputs = shared ? p.kv_heads : p.batch * p.kv_heads;
    if (outputs > 0) {
      sink_grad_reduce_kernel<<<static_cast<unsigned>(outputs), kReduceThreads, 0, stream>>>(
          p.batch, p.heads, p.kv_heads, p.head_dim, blocks, shared, part_k, part_v,
          static_cast<float*>(p.dsink_k), static_cast<float*>(p.dsink_v));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  if (logit) {
    sink_logit_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(p.batch, p.heads, blocks, part_logit,
                                                               static_cast<float*>(p.dsink_logit));
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace sinkdlm
