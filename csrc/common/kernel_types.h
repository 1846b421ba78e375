// What every kernel's params are made of: the element type and element strides. Plain C++ (no
// torch, no CUDA headers), so the CPU kernels, the CUDA kernels and both sides of the op
// registrations include the same definitions.
#pragma once

#include <cstdint>

namespace sinkdlm {

// The element type of a kernel's main tensors; each op states which it accepts.
enum class ScalarType : int32_t { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Element strides of a (B, H, L, D) attention tensor: q, k, v, out, dout.
struct Strides4 {
  int64_t b = 0, h = 0, l = 0, d = 0;
};

// Element strides of a (B, H, L) per-row tensor: an lse, which may be a view of a wider buffer.
struct Strides3 {
  int64_t b = 0, h = 0, l = 0;
};

// Element strides of the (B, L) dimensions of a per-token tensor: (B, L), or the rows of a
// (B, L, V) whose last dimension is contiguous.
struct Strides2 {
  int64_t b = 0, l = 0;
};

}  // namespace sinkdlm
