// Device helpers the CUDA kernels share: warp reductions, and reading and writing elements of each
// ScalarType (16-bit floats as raw bits, converted to and from float), loads 16 bytes at a time.
// Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../csrc/common/kernel_types.h"

namespace sinkdlm {
namespace device {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// x of lane (lane ^ lane_mask), for any trivially copyable T made of whole 32-bit words (a
// struct of floats and ints is shuffled word by word).
template <typename T>
__device__ __forceinline__ T shfl_xor(const T& x, int lane_mask) {
  static_assert(sizeof(T) % sizeof(uint32_t) == 0, "shuffled as 32-bit words");
  constexpr int kWords = sizeof(T) / sizeof(uint32_t);
  uint32_t words[kWords];
  memcpy(words, &x, sizeof(T));
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = __shfl_xor_sync(kFullWarp, words[w], lane_mask);
  T out;
  memcpy(&out, words, sizeof(T));
  return out;
}

// Reduces x over the 32 lanes of a warp, every lane getting the result. Each step sets
// x = combine(x, x of the lane offset apart), offset = 16, 8, ..., 1, so lane 0 sees a fixed order
// (lane 0 with 16, then with 8 and 24, ...): the same as a shfl_down tree.
template <typename T, typename Combine>
__device__ __forceinline__ T warp_reduce(T x, Combine combine) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x = combine(x, shfl_xor(x, offset));
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  return warp_reduce(x, [](T a, T b) { return a + b; });
}

// How a kernel reads and writes elements of a ScalarType: the stored type, its value as float, the
// stored value of a float (rounded to nearest even), and how many make one 16-byte load.
template <ScalarType kType>
struct Element;
template <>
struct Element<ScalarType::kFloat32> {
  using Storage = float;
  static constexpr int kPerVector = 4;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};
template <>
struct Element<ScalarType::kFloat16> {
  using Storage = uint16_t;
  static constexpr int kPerVector = 8;
  __device__ static float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ static uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <>
struct Element<ScalarType::kBFloat16> {
  using Storage = uint16_t;
  static constexpr int kPerVector = 8;
  __device__ static float to_float(uint16_t bits) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  }
  __device__ static uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// Calls visit(value as float, index) for the indices in [0, n) of `row` that thread `thread` of
// kThreads takes: a scalar head up to 16-byte alignment, a body of 16-byte loads (__ldg), a scalar
// tail. Each thread visits its indices in increasing order.
template <ScalarType kType, int kThreads, typename Visit>
__device__ __forceinline__ void for_each_element(const typename Element<kType>::Storage* row, int n,
                                                 int thread, Visit visit) {
  using E = Element<kType>;
  using Storage = typename E::Storage;
  const int misalignment = static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16);
  int head = misalignment == 0 ? 0 : (16 - misalignment) / static_cast<int>(sizeof(Storage));
  head = head < n ? head : n;
  const int vectors = (n - head) / E::kPerVector;
  const int tail_start = head + vectors * E::kPerVector;

  for (int v = thread; v < head; v += kThreads) visit(E::to_float(row[v]), v);
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  for (int i = thread; i < vectors; i += kThreads) {
    const uint4 raw = __ldg(body + i);
    Storage values[E::kPerVector];
    static_assert(sizeof(values) == sizeof(uint4), "one 16-byte load per vector");
    memcpy(values, &raw, sizeof(raw));
    const int v0 = head + i * E::kPerVector;
#pragma unroll
    for (int j = 0; j < E::kPerVector; ++j) visit(E::to_float(values[j]), v0 + j);
  }
  for (int v = tail_start + thread; v < n; v += kThreads) visit(E::to_float(row[v]), v);
}

}  // namespace device
}  // namespace sinkdlm
