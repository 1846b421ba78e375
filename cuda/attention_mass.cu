// Attention mass per key from the forward's log-sum-exp (CUDA). One block handles a tile of kKeys
// keys of one (batch, head): the tile's K rows sit in shared memory transposed ([d][key], so a warp
// reads consecutive banks), each lane owns one key, and the kWarps warps split the query rows; a
// query row's elements are read by the whole warp at one address (a broadcast). Partial sums are
// reduced across warps at the end; nothing of size L x L exists. Blocks of key tile 0 also sum the
// mass on the sink (key sink and/or logit sink).
#include "attention_mass.h"
#include "common.cuh"

namespace sinkdlm {
namespace {

constexpr int kKeys = device::kWarpSize;  // lane <-> key
constexpr int kWarps = 4;

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

template <typename T>
__global__ void __launch_bounds__(kKeys* kWarps)
    attention_mass_kernel(const AttentionMassParams p) {
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

  const Strides4 &qs = p.q_stride, &ks = p.k_stride;
  const T* kb = static_cast<const T*>(p.k) + b * ks.b + hk * ks.h;
  for (int64_t e = threadIdx.x; e < kKeys * D; e += blockDim.x) {
    const int64_t jj = e / D, d = e % D;
    k_tile[d * kKeys + jj] = j0 + jj < L ? kb[(j0 + jj) * ks.l + d * ks.d] : T(0);
  }
  __syncthreads();

  const T* sink_logit = static_cast<const T*>(p.sink_logit);
  const bool sink_block = blockIdx.x == 0 && (p.sink_k != nullptr || sink_logit != nullptr);
  const bool* mask = p.key_padding_mask ? p.key_padding_mask + b * L : nullptr;
  const T* qb = static_cast<const T*>(p.q) + b * qs.b + h * qs.h;
  const T* lb = static_cast<const T*>(p.lse) + (b * p.heads + h) * L;
  const T scale = static_cast<T>(p.scale);
  T acc = 0, sink_acc = 0;
  int rows = 0;
  for (int64_t i = warp; i < L; i += kWarps) {
    if (mask != nullptr && !mask[i]) continue;  // warp-uniform: all lanes share the query row
    ++rows;
    const T* qi = qb + i * qs.l;
    T dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += qi[d * qs.d] * k_tile[d * kKeys + lane];
    const T lse_i = lb[i];
    acc += exp_of(dot * scale - lse_i);  // lanes past L compute a value that is never stored
    if (sink_block) {
      T s = 0;
      if (p.sink_k != nullptr) {
        const T* sk = static_cast<const T*>(p.sink_k) + b * p.sink_batch_stride + hk * D;
        T part = 0;
        for (int64_t d = lane; d < D; d += kKeys) part += qi[d * qs.d] * sk[d];
        s += exp_of(device::warp_sum(part) * scale - lse_i);
      }
      if (sink_logit != nullptr) s += exp_of(sink_logit[h] - lse_i);
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
    const bool real_key = mask == nullptr || mask[j];
    static_cast<T*>(p.mass)[bh * L + j] = real_key ? total * inv : T(0);
  }
  if (blockIdx.x == 0 && lane == 0) static_cast<T*>(p.sink_mass)[bh] = sink_total * inv;
}

template <typename T>
cudaError_t launch(const AttentionMassParams& p, cudaStream_t stream) {
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

}  // namespace

cudaError_t attention_mass_cuda(const AttentionMassParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.heads <= 0) return cudaSuccess;
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0 || p.head_dim <= 0 || p.batch > 65535 ||
      p.heads > 65535)
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case ScalarType::kFloat32:
      return launch<float>(p, stream);
    case ScalarType::kFloat64:
      return launch<double>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sinkdlm
