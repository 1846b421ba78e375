// CUDA remasking step: kernel 1 scans each eligible position's logits once (one block per
// position, 16-byte loads) computing max, log-sum-exp, the noisy argmax, the second max and the
// entropy together; kernel 2 picks each row's most confident positions with a block-wide radix
// select over unique 64-bit ranking keys and scatters the result.
#include <climits>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "../csrc/remask/philox.h"
#include "common.cuh"
#include "remask_step.h"

namespace sinkdlm {
namespace remask {
namespace {

constexpr int kScanThreads = 256;
constexpr int kSelectThreads = 256;
constexpr int kRadixBins = 256;

struct ScanState {
  float max, sum, weighted;  // online softmax: sum e^(x - max), sum e^(x - max) (x - max)
  float best_score, best_logit;
  int best_index;
  float top1, top2;
  // Non-finite logits, the CPU core's rule: a NaN (or no entry above -inf) leaves the
  // distribution undefined (confidence NaN, the op raises); n_inf +inf entries share it.
  int has_nan, n_inf;
};

__device__ __forceinline__ void init_state(ScanState& s) {
  s.max = -INFINITY;
  s.sum = 0.0f;
  s.weighted = 0.0f;
  s.best_score = -INFINITY;
  s.best_logit = -INFINITY;
  s.best_index = INT_MAX;
  s.top1 = -INFINITY;
  s.top2 = -INFINITY;
  s.has_nan = 0;
  s.n_inf = 0;
}

struct ScanConfig {
  bool noisy, need_softmax, need_entropy, need_second;
  float inv_temperature;
  uint64_t seed;
  uint32_t offset;
  int64_t b, l;
};

// Visits one vocabulary entry; a thread visits its entries in increasing order, so a strict
// comparison keeps the lowest index among equal scores.
__device__ __forceinline__ void visit(ScanState& s, float logit, int v, const ScanConfig& c) {
  if (isnan(logit)) {
    s.has_nan = 1;
    return;
  }
  if (logit == INFINITY) ++s.n_inf;
  float score = logit;
  if (c.noisy) {
    // Rounded product, then sum: the same arithmetic as the CPU core and the reference.
    score = __fadd_rn(__fmul_rn(logit, c.inv_temperature),
                      philox::gumbel(c.seed, c.offset, c.b, c.l, v));
  }
  if (score > s.best_score || s.best_index == INT_MAX) {
    s.best_score = score;
    s.best_logit = logit;
    s.best_index = v;
  }
  if (c.need_second) {
    if (logit > s.top1) {
      s.top2 = s.top1;
      s.top1 = logit;
    } else if (logit > s.top2) {
      s.top2 = logit;
    }
  }
  // -inf adds nothing (and -inf - -inf is nan); +inf is counted in n_inf instead.
  if (c.need_softmax && logit > -INFINITY && logit < INFINITY) {
    if (logit > s.max) {
      if (s.sum > 0.0f) {
        const float shift = s.max - logit;
        const float scale = __expf(shift);
        s.weighted = scale * (s.weighted + s.sum * shift);
        s.sum *= scale;
      }
      s.max = logit;
    }
    const float shifted = logit - s.max;
    const float e = __expf(shifted);
    s.sum += e;
    if (c.need_entropy && e > 0.0f) s.weighted += e * shifted;
  }
}

__device__ __forceinline__ void combine(ScanState& a, const ScanState& b, const ScanConfig& c) {
  a.has_nan |= b.has_nan;
  a.n_inf += b.n_inf;
  if (b.best_index != INT_MAX && (a.best_index == INT_MAX || b.best_score > a.best_score ||
                                  (b.best_score == a.best_score && b.best_index < a.best_index))) {
    a.best_score = b.best_score;
    a.best_logit = b.best_logit;
    a.best_index = b.best_index;
  }
  if (c.need_second) {
    const float top2 = fmaxf(fminf(a.top1, b.top1), fmaxf(a.top2, b.top2));
    a.top1 = fmaxf(a.top1, b.top1);
    a.top2 = top2;
  }
  if (c.need_softmax) {
    const float m = fmaxf(a.max, b.max);
    float sum = 0.0f, weighted = 0.0f;
    if (a.sum > 0.0f) {
      const float shift = a.max - m, scale = __expf(shift);
      sum += a.sum * scale;
      weighted += scale * (a.weighted + a.sum * shift);
    }
    if (b.sum > 0.0f) {
      const float shift = b.max - m, scale = __expf(shift);
      sum += b.sum * scale;
      weighted += scale * (b.weighted + b.sum * shift);
    }
    a.max = m;
    a.sum = sum;
    a.weighted = weighted;
  }
}

__device__ __forceinline__ bool is_eligible(const RemaskStepParams& p, int64_t b, int64_t l) {
  const int64_t start = p.window ? p.window[2 * b] : 0;
  const int64_t end = p.window ? p.window[2 * b + 1] : p.seq_len;
  return l >= start && l < end && p.x[b * p.x_stride.b + l * p.x_stride.l] == p.mask_id;
}

template <ScalarType kType>
__global__ void __launch_bounds__(kScanThreads) scan_kernel(const RemaskStepParams p) {
  using Storage = typename device::Element<kType>::Storage;
  const int64_t position = blockIdx.x;
  const int64_t b = position / p.seq_len, l = position % p.seq_len;
  if (!is_eligible(p, b, l)) {  // block-uniform
    if (threadIdx.x == 0) {
      p.x_new[position] = p.x[b * p.x_stride.b + l * p.x_stride.l];
      p.confidence[position] = -INFINITY;
    }
    return;
  }
  const ScanConfig c{p.inv_temperature > 0.0f,
                     p.strategy != Strategy::kRandom,
                     p.strategy == Strategy::kEntropy,
                     p.strategy == Strategy::kMargin,
                     p.inv_temperature,
                     p.seed,
                     p.offset,
                     b,
                     l};
  const Storage* row =
      static_cast<const Storage*>(p.logits) + b * p.logits_stride.b + l * p.logits_stride.l;

  ScanState s;
  init_state(s);
  device::for_each_element<kType, kScanThreads>(row, static_cast<int>(p.vocab), threadIdx.x,
                                                [&](float logit, int v) { visit(s, logit, v, c); });

  // Warp, then block reduction.
  const auto merge = [&](ScanState a, const ScanState& other) {
    combine(a, other, c);
    return a;
  };
  s = device::warp_reduce(s, merge);
  constexpr int kWarps = kScanThreads / device::kWarpSize;
  __shared__ ScanState warp_states[kWarps];
  const int warp = threadIdx.x / device::kWarpSize, lane = threadIdx.x % device::kWarpSize;
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp != 0) return;
  if (lane < kWarps) {
    s = warp_states[lane];
  } else {
    init_state(s);
  }
  s = device::warp_reduce(s, merge);
  if (lane != 0) return;

  double confidence = 0.0;
  if (s.has_nan || s.best_logit == -INFINITY) {
    confidence = NAN;
  } else if (s.n_inf > 0 && p.strategy != Strategy::kRandom) {
    const double share = 1.0 / static_cast<double>(s.n_inf);
    confidence = p.strategy == Strategy::kLowConfidence ? (s.best_logit == INFINITY ? share : 0.0)
                 : p.strategy == Strategy::kMargin      ? (s.n_inf == 1 ? 1.0 : 0.0)
                                                        : log(share);
  } else {
    switch (p.strategy) {
      case Strategy::kLowConfidence:
        confidence = exp(static_cast<double>(s.best_logit) - s.max) / s.sum;
        break;
      case Strategy::kMargin:
        confidence =
            (exp(static_cast<double>(s.top1) - s.max) - exp(static_cast<double>(s.top2) - s.max)) /
            s.sum;
        break;
      case Strategy::kEntropy:
        confidence = static_cast<double>(s.weighted) / s.sum - log(static_cast<double>(s.sum));
        break;
      case Strategy::kRandom:
        confidence = philox::position_uniform(p.seed, p.offset, b, l);
        break;
    }
  }
  p.x_new[position] = s.best_index == INT_MAX ? 0 : s.best_index;
  p.confidence[position] = static_cast<float>(confidence);
}

// One block per row: radix select (8 bits per pass, most significant first) of the k-th largest
// ranking key among the eligible positions, then the scatter.
__global__ void __launch_bounds__(kSelectThreads) select_kernel(const RemaskStepParams p) {
  using BlockReduce = cub::BlockReduce<int, kSelectThreads>;
  using BlockScan = cub::BlockScan<int, kSelectThreads>;
  __shared__ union {
    typename BlockReduce::TempStorage reduce;
    typename BlockScan::TempStorage scan;
  } temp;
  __shared__ int histogram[kRadixBins];
  __shared__ int shared_digit, shared_remaining, shared_count;
  static_assert(kSelectThreads == kRadixBins, "one histogram bin per thread");

  const int64_t b = blockIdx.x;
  const int64_t seq_len = p.seq_len;
  const float* confidence = p.confidence + b * seq_len;

  int local = 0;
  for (int64_t l = threadIdx.x; l < seq_len; l += kSelectThreads) local += is_eligible(p, b, l);
  const int eligible = BlockReduce(temp.reduce).Sum(local);
  if (threadIdx.x == 0) shared_count = eligible;
  __syncthreads();
  const int64_t num_eligible = shared_count;
  int64_t k = p.num_transfer[b] < num_eligible ? p.num_transfer[b] : num_eligible;
  if (p.has_threshold && num_eligible > 0 && k < 1) k = 1;

  uint64_t prefix = 0, prefix_mask = 0;
  if (k > 0) {
    int remaining = static_cast<int>(k);
    for (int shift = 56; shift >= 0; shift -= 8) {
      histogram[threadIdx.x] = 0;
      __syncthreads();
      for (int64_t l = threadIdx.x; l < seq_len; l += kSelectThreads) {
        if (!is_eligible(p, b, l)) continue;
        const uint64_t key = rank_key(confidence[l], l);
        if ((key & prefix_mask) == prefix) atomicAdd(&histogram[(key >> shift) & 0xFF], 1);
      }
      __syncthreads();
      // Thread t holds digit 255 - t: the inclusive sum counts keys with a digit >= 255 - t.
      const int count = histogram[kRadixBins - 1 - threadIdx.x];
      int at_least;
      BlockScan(temp.scan).InclusiveSum(count, at_least);
      const int above = at_least - count;
      if (above < remaining && at_least >= remaining) {
        shared_digit = kRadixBins - 1 - threadIdx.x;
        shared_remaining = remaining - above;
      }
      __syncthreads();
      prefix |= static_cast<uint64_t>(shared_digit) << shift;
      prefix_mask |= static_cast<uint64_t>(0xFF) << shift;
      remaining = shared_remaining;
      __syncthreads();
    }
  }
  const uint64_t cutoff = prefix;  // keys are unique: after 8 digits, the k-th largest key

  for (int64_t l = threadIdx.x; l < seq_len; l += kSelectThreads) {
    const int64_t position = b * seq_len + l;
    const bool eligible_here = is_eligible(p, b, l);
    const bool pick =
        eligible_here && k > 0 &&
        (rank_key(confidence[l], l) >= cutoff || (p.has_threshold && confidence[l] >= p.threshold));
    p.transferred[position] = pick;
    if (eligible_here && !pick) p.x_new[position] = p.mask_id;
  }
}

template <ScalarType kType>
cudaError_t launch(const RemaskStepParams& p, cudaStream_t stream) {
  const int64_t positions = p.batch * p.seq_len;
  scan_kernel<kType><<<static_cast<unsigned>(positions), kScanThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  select_kernel<<<static_cast<unsigned>(p.batch), kSelectThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t remask_step_cuda(const RemaskStepParams& params, cudaStream_t stream) {
  const int64_t positions = params.batch * params.seq_len;
  if (positions == 0) return cudaSuccess;
  if (positions > INT_MAX || params.vocab > INT_MAX || params.seq_len > UINT32_MAX) {
    return cudaErrorInvalidValue;
  }
  switch (params.logits_dtype) {
    case ScalarType::kFloat16:
      return launch<ScalarType::kFloat16>(params, stream);
    case ScalarType::kBFloat16:
      return launch<ScalarType::kBFloat16>(params, stream);
    case ScalarType::kFloat32:
      return launch<ScalarType::kFloat32>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace remask
}  // namespace sinkdlm
