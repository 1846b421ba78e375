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

// The ScalarType whose Element (common.cuh) reads and writes storage type T; float16 and bfloat16
// are their raw bits (half.h), so a T is read as that Element's Storage.
template <typename T>
struct ScalarTypeOf;
template <>
struct ScalarTypeOf<float> {
  static constexpr ScalarType value = ScalarType::kFloat32;
};
template <>
struct ScalarTypeOf<float16> {
  static constexpr ScalarType value = ScalarType::kFloat16;
};
template <>
struct ScalarTypeOf<bfloat16> {
  static constexpr ScalarType value = ScalarType::kBFloat16;
};

template <typename T>
using ElementOf = device::Element<ScalarTypeOf<T>::value>;

template <typename T>
__device__ __forceinline__ float to_f32(const T& x) {
  return ElementOf<T>::to_float(reinterpret_cast<const typename ElementOf<T>::Storage&>(x));
}

template <typename T>
__device__ __forceinline__ void store_f32(T& x, float v) {
  reinterpret_cast<typename ElementOf<T>::Storage&>(x) = ElementOf<T>::from_float(v);
}

// Row (b, h, i) of a (B, H, L, D) tensor.
template <typename T>
__device__ __forceinline__ T* row(T* x, const Strides4& st, int64_t b, int64_t h, int64_t i) {
  return x + b * st.b + h * st.h + i * st.l;
}

// grid (ceil(L / kWarps), H, B); warp w of block x handles row x * kWarps + w.
template <typename T>
__global__ void __launch_bounds__(kWarpSize* kWarps)
    sink_merge_fwd_kernel(const SinkMergeParams<T, float> p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t h = blockIdx.y, b = blockIdx.z, L = p.seq_len, D = p.head_dim;
  if (i >= L) return;  // warp-uniform
  T* o = row(p.out, p.out_stride, b, h, i);
  float* lse_out = p.lse + (b * p.heads + h) * L + i;
  if (p.row_mask != nullptr && !p.row_mask[b * L + i]) {
    for (int64_t d = lane; d < D; d += kWarpSize) store_f32(o[d], 0.f);
    if (lane == 0) *lse_out = 0.f;
    return;
  }
  const int64_t hk = h / (p.heads / p.kv_heads);
  const int64_t sink_offset = b * p.sink_batch_stride + hk * D;
  const T* qi = row(p.q, p.q_stride, b, h, i);
  float s = -INFINITY;
  if (p.sink_k != nullptr) {
    float part = 0.f;
    for (int64_t d = lane; d < D; d += kWarpSize) part += to_f32(qi[d]) * p.sink_k[sink_offset + d];
    s = p.scale * warp_sum(part);
  }
  const float lam = p.sink_logit != nullptr ? p.sink_logit[h] : -INFINITY;
  const float lse_tok =
      p.attn_lse[b * p.attn_lse_stride.b + h * p.attn_lse_stride.h + i * p.attn_lse_stride.l];
  const float m = fmaxf(lse_tok, fmaxf(s, lam));
  const float lse = m + logf(expf(lse_tok - m) + expf(s - m) + expf(lam - m));
  const float w_tok = expf(lse_tok - lse);
  const float w_sink = p.sink_v != nullptr ? expf(s - lse) : 0.f;
  const T* ai = row(p.attn_out, p.attn_out_stride, b, h, i);
  for (int64_t d = lane; d < D; d += kWarpSize) {
    float x = to_f32(ai[d]) * w_tok;  // read before the write: o may alias ai
    if (p.sink_v != nullptr) x += w_sink * p.sink_v[sink_offset + d];
    store_f32(o[d], x);
  }
  if (lane == 0) *lse_out = lse;
}

// grid (ceil(L / kRowsPerBlock), H, B). Writes one partial per block:
// part_k / part_v [(b * H + h) * blocks + block][D], part_logit [(b * H + h) * blocks + block].
template <typename T>
__global__ void __launch_bounds__(kWarpSize* kWarps)
    sink_merge_bwd_rows_kernel(const SinkMergeBwdParams<T, float> p, float* part_k, float* part_v,
                               float* part_logit) {
  __shared__ float red_k[kWarps][kSinkMergeMaxHeadDim];
  __shared__ float red_v[kWarps][kSinkMergeMaxHeadDim];
  __shared__ float red_logit[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t L = p.seq_len, D = p.head_dim, bh = b * p.heads + h;
  const int64_t hk = h / (p.heads / p.kv_heads);
  const bool token = p.sink_k != nullptr;
  const float* sk = token ? p.sink_k + b * p.sink_batch_stride + hk * D : nullptr;
  const float* sv = token ? p.sink_v + b * p.sink_batch_stride + hk * D : nullptr;
  float acc_k[kPerLane] = {}, acc_v[kPerLane] = {};
  float acc_logit = 0.f;
  const int64_t i_end = min(L, (block + 1) * kRowsPerBlock);
  for (int64_t i = block * kRowsPerBlock + warp; i < i_end; i += kWarps) {
    if (p.row_mask != nullptr && !p.row_mask[b * L + i]) continue;  // warp-uniform
    const T* qi = row(p.q, p.q_stride, b, h, i);
    const T* doi = row(p.dout, p.dout_stride, b, h, i);
    const T* oi = row(p.out, p.out_stride, b, h, i);
    float dov[kPerLane], qv[kPerLane];
    float delta = 0.f, do_sv = 0.f, q_sk = 0.f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int64_t d = lane + c * kWarpSize;
      dov[c] = qv[c] = 0.f;
      if (d < D) {
        dov[c] = to_f32(doi[d]);
        delta += dov[c] * to_f32(oi[d]);
        if (token) {
          qv[c] = to_f32(qi[d]);
          do_sv += dov[c] * sv[d];
          q_sk += qv[c] * sk[d];
        }
      }
    }
    delta = warp_sum(delta);
    const float lse = p.lse[bh * L + i];
    const float g = p.dlse != nullptr ? p.dlse[bh * L + i] : 0.f;
    if (token) {
      const float prob = expf(p.scale * warp_sum(q_sk) - lse);
      const float ds = prob * (warp_sum(do_sv) - delta + g);
      T* dqi = row(p.dq, p.dq_stride, b, h, i);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int64_t d = lane + c * kWarpSize;
        if (d < D) {
          acc_v[c] += prob * dov[c];
          acc_k[c] += p.scale * ds * qv[c];
          store_f32(dqi[d], to_f32(dqi[d]) + p.scale * ds * sk[d]);
        }
      }
    }
    if (p.sink_logit != nullptr) acc_logit += expf(p.sink_logit[h] - lse) * (g - delta);
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
  if (p.sink_logit != nullptr && threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += red_logit[w];
    part_logit[slot] = s;
  }
}

// One block per output sink row o (hk for a shared sink, b * Hkv + hk per batch).
__global__ void __launch_bounds__(kReduceThreads)
    sink_merge_bwd_reduce_kernel(int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                 int64_t blocks, bool shared, const float* part_k,
                                 const float* part_v, float* dsink_k, float* dsink_v) {
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
    sink_merge_bwd_logit_reduce_kernel(int64_t batch, int64_t heads, int64_t blocks,
                                       const float* part_logit, float* dsink_logit) {
  for (int64_t h = threadIdx.x; h < heads; h += blockDim.x) {
    float s = 0.f;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t blk = 0; blk < blocks; ++blk) s += part_logit[(b * heads + h) * blocks + blk];
    dsink_logit[h] = s;
  }
}

int64_t row_blocks(int64_t seq_len) { return (seq_len + kRowsPerBlock - 1) / kRowsPerBlock; }

bool dims_ok(int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  return batch <= 65535 && heads <= 65535 && kv_heads > 0 && heads % kv_heads == 0 &&
         head_dim > 0 && head_dim <= kSinkMergeMaxHeadDim;
}

}  // namespace

template <typename T>
cudaError_t launch_sink_merge_fwd(const SinkMergeParams<T, float>& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seq_len == 0) return cudaSuccess;
  if (!dims_ok(p.batch, p.heads, p.kv_heads, p.head_dim) || p.q_stride.d != 1 ||
      p.attn_out_stride.d != 1 || p.out_stride.d != 1)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((p.seq_len + kWarps - 1) / kWarps),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  sink_merge_fwd_kernel<T><<<grid, kWarpSize * kWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

size_t sink_merge_bwd_workspace_bytes(int64_t batch, int64_t heads, int64_t seq_len,
                                      int64_t head_dim) {
  const int64_t slots = batch * heads * row_blocks(seq_len);
  return sizeof(float) * static_cast<size_t>(slots * (2 * head_dim + 1));
}

template <typename T>
cudaError_t launch_sink_merge_bwd(const SinkMergeBwdParams<T, float>& p, void* workspace,
                                  cudaStream_t stream) {
  const bool token = p.sink_k != nullptr, logit = p.sink_logit != nullptr;
  if (!token && !logit) return cudaSuccess;
  if (!dims_ok(p.batch, p.heads, p.kv_heads, p.head_dim) || p.q_stride.d != 1 ||
      p.dout_stride.d != 1 || p.out_stride.d != 1 || p.dq_stride.d != 1)
    return cudaErrorInvalidValue;
  const int64_t blocks = row_blocks(p.seq_len);
  const int64_t slots = p.batch * p.heads * blocks;
  float* part_k = static_cast<float*>(workspace);
  float* part_v = part_k + slots * p.head_dim;
  float* part_logit = part_v + slots * p.head_dim;
  if (slots > 0) {
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.heads),
                    static_cast<unsigned>(p.batch));
    sink_merge_bwd_rows_kernel<T>
        <<<grid, kWarpSize * kWarps, 0, stream>>>(p, part_k, part_v, part_logit);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (token) {
    const bool shared = p.sink_batch_stride == 0;
    const int64_t outputs = shared ? p.kv_heads : p.batch * p.kv_heads;
    if (outputs > 0) {
      sink_merge_bwd_reduce_kernel<<<static_cast<unsigned>(outputs), kReduceThreads, 0, stream>>>(
          p.batch, p.heads, p.kv_heads, p.head_dim, blocks, shared, part_k, part_v, p.dsink_k,
          p.dsink_v);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  if (logit) {
    sink_merge_bwd_logit_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(p.batch, p.heads, blocks,
                                                                         part_logit, p.dsink_logit);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

#define SINKDLM_INSTANTIATE_SINK_MERGE_CUDA(T)                                                   \
  template cudaError_t launch_sink_merge_fwd<T>(const SinkMergeParams<T, float>&, cudaStream_t); \
  template cudaError_t launch_sink_merge_bwd<T>(const SinkMergeBwdParams<T, float>&, void*,      \
                                                cudaStream_t);
SINKDLM_INSTANTIATE_SINK_MERGE_CUDA(float)
SINKDLM_INSTANTIATE_SINK_MERGE_CUDA(float16)
SINKDLM_INSTANTIATE_SINK_MERGE_CUDA(bfloat16)
#undef SINKDLM_INSTANTIATE_SINK_MERGE_CUDA

}  // namespace sinkdlm
