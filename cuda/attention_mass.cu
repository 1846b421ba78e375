// Attention mass per key from the forward's log-sum-exp (CUDA). One block handles a tile of kKeys
// keys of one (batch, head): the tile's K rows sit in shared memory transposed ([d][key], so a warp
// reads consecutive banks), each lane owns one key, and the kWarps warps split the query rows; a
// query row's elements are read by the whole warp at one address (a broadcast). Partial sums are
// reduced across warps at the end; nothing of size L x L exists. Blocks of key tile 0 also sum the
// mass on the sink (key sink and/or logit sink).
#include "attention_mass.h"

namespace sinkdlm {
namespace {

constexpr int kKeys = 32;  // = warp size: lane <-> key
constexpr int kWarps = 4;

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kKeys* kWarps)
    attention_mass_kernel(const AttentionMassParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_tile = reinterpret_cast<T*>(smem_raw);  // [head_dim][kKeys]
  __shared__ T partial[kWarps][kKeys];
  __shared__ T sink_partial[kWarps];
  __shared__ int rows_partial[kWarps];

  const int64_t L = p.seq_len, D = p.head_dim;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t hk = h / (p.heads / p.kv_heads);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kKeys;
  const int lane = threadIdx.x % kKeys, warp = threadIdx.x / kKeys;

  const T* kb = p.k + b * p.k_stride[0] + hk * p.k_stride[1];
  for (int64_t e = threadIdx.x; e < kKeys * D; e += blockDim.x) {
    const int64_t jj = e / D, d = e % D;
    k_tile[d * kKeys + jj] = j0 + jj < L ? kb[(j0 + jj) * p.k_stride[2] + d * p.k_stride[3]] : T(0);
  }
  __syncthreads();

  const bool sink_block = blockIdx.x == 0 && (p.sink_k != nullptr || p.sink_logit != nullptr);
  const T* qb = p.q + b * p.q_stride[0] + h * p.q_stride[1];
  const T* lb = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
  const T scale = static_cast<T>(p.scale);
  T acc = 0, sink_acc = 0;
  int rows = 0;
  for (int64_t i = warp; i < L; i += kWarps) {
    // Warp-uniform branch: all lanes share the query row.
    if (p.key_padding_mask != nullptr &&
        !p.key_padding_mask[b * p.mask_stride[0] + i * p.mask_stride[1]])
      continue;
    ++rows;
    const T* qi = qb + i * p.q_stride[2];
    T dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += qi[d * p.q_stride[3]] * k_tile[d * kKeys + lane];
    const T lse_i = lb[i * p.lse_stride[2]];
    acc += exp_of(dot * scale - lse_i);  // lanes past L compute a value that is never stored
    if (sink_block) {
      T s = 0;
      if (p.sink_k != nullptr) {
        const T* sk = p.sink_k + b * p.sink_k_stride[0] + hk * p.sink_k_stride[1];
        T part = 0;
        for (int64_t d = lane; d < D; d += kKeys)
          part += qi[d * p.q_stride[3]] * sk[d * p.sink_k_stride[2]];
        s += exp_of(warp_sum(part) * scale - lse_i);
      }
      if (p.sink_logit != nullptr) s += exp_of(p.sink_logit[h * p.sink_logit_stride] - lse_i);
      sink_acc += s;
    }
  }
  partial[warp][lane] = acc;
  if (lane == 0) {
    sink_partial[warp] = sink_acc;
    rows_partial[warp] = rows;
  }
  __syncthreads();
  if (warp != 0) return;
  T total = 0, sink_total = 0;
  int n_real = 0;
  for (int w = 0; w < kWarps; ++w) {
    total += partial[w][lane];
    sink_total += sink_partial[w];
    n_real += rows_partial[w];
  }
  const T inv = n_real > 0 ? T(1) / static_cast<T>(n_real) : T(0);
  const int64_t j = j0 + lane;
  const int64_t bh = b * p.heads + h;
  if (j < L) {
    const bool real_key = p.key_padding_mask == nullptr ||
                          p.key_padding_mask[b * p.mask_stride[0] + j * p.mask_stride[1]];
    p.mass[bh * L + j] = real_key ? total * inv : T(0);
  }
  if (blockIdx.x == 0 && lane == 0) p.sink_mass[bh] = sink_total * inv;
}

}  // namespace

template <typename T>
cudaError_t launch_attention_mass(const AttentionMassParams<T>& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.heads <= 0) return cudaSuccess;
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0 || p.head_dim <= 0 || p.batch > 65535 ||
      p.heads > 65535)
    return cudaErrorInvalidValue;
  if (p.seq_len == 0)  // no keys, no rows: the sink receives nothing
    return cudaMemsetAsync(p.sink_mass, 0, sizeof(T) * p.batch * p.heads, stream);
  const size_t smem = sizeof(T) * kKeys * p.head_dim;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(attention_mass_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>((p.seq_len + kKeys - 1) / kKeys),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  attention_mass_kernel<T><<<grid, kKeys * kWarps, smem, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_attention_mass<float>(const AttentionMassParams<float>&, cudaStream_t);
template cudaError_t launch_attention_mass<double>(const AttentionMassParams<double>&,
                                                   cudaStream_t);

}  // namespace sinkdlm
