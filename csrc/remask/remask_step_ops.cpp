// sinkdlm::remask_step: schema, argument checks and the CPU implementation (the core lives in
// remask_step_cpu.cpp, torch-free).
#include "remask/remask_step_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "remask/remask_step_cpu.h"

namespace sinkdlm {
namespace remask {
namespace {

Strategy parse_strategy(const std::string& strategy) {
  if (strategy == "low_confidence") return Strategy::kLowConfidence;
  if (strategy == "margin") return Strategy::kMargin;
  if (strategy == "entropy") return Strategy::kEntropy;
  if (strategy == "random") return Strategy::kRandom;
  TORCH_CHECK_VALUE(false,
                    "remask_step: strategy must be one of 'low_confidence', 'margin', 'entropy', "
                    "'random', got '",
                    strategy, "'");
}

}  // namespace

RemaskStepCall prepare_remask_step(const at::Tensor& logits, const at::Tensor& x, int64_t mask_id,
                                   const at::Tensor& num_transfer,
                                   const std::optional<at::Tensor>& window,
                                   const std::string& strategy, double temperature,
                                   std::optional<double> threshold, int64_t seed, int64_t offset) {
  RemaskStepCall call;
  TORCH_CHECK_VALUE(logits.dim() == 3, "remask_step: logits must be (B, L, V), got shape ",
                    logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "remask_step: logits must be float32, float16 or bfloat16, got ", dtype);
  const int64_t batch = logits.size(0), length = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK_VALUE(vocab > 0, "remask_step: logits must have a non-empty vocabulary (V > 0)");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == batch && x.size(1) == length,
                    "remask_step: x must be (B, L) = (", batch, ", ", length,
                    ") like logits, got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kLong, "remask_step: x must be int64, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(num_transfer.dim() == 1 && num_transfer.size(0) == batch,
                    "remask_step: num_transfer must be (B,) = (", batch, ",), got shape ",
                    num_transfer.sizes());
  TORCH_CHECK_TYPE(num_transfer.scalar_type() == at::kLong,
                   "remask_step: num_transfer must be int64, got ", num_transfer.scalar_type());
  TORCH_CHECK_VALUE(x.device() == logits.device() && num_transfer.device() == logits.device(),
                    "remask_step: x and num_transfer must be on the logits' device ",
                    logits.device(), ", got ", x.device(), " and ", num_transfer.device());
  TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < vocab,
                    "remask_step: mask_id must be in [0, V = ", vocab, "), got ", mask_id);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0.0,
                    "remask_step: temperature must be finite and >= 0, got ", temperature);
  TORCH_CHECK_VALUE(temperature == 0.0 || std::isfinite(static_cast<float>(1.0 / temperature)),
                    "remask_step: temperature must be 0 or at least 1 / FLT_MAX (its inverse is "
                    "taken in float32), got ",
                    temperature);
  TORCH_CHECK_VALUE(!threshold.has_value() || !std::isnan(*threshold),
                    "remask_step: threshold must be a number, got nan");
  TORCH_CHECK_VALUE(offset >= 0 && offset <= std::numeric_limits<uint32_t>::max(),
                    "remask_step: offset must be in [0, 2^32), got ", offset);
  // Values are checked on the host (for CUDA tensors: a copy of B or 2B integers).
  const at::Tensor num_transfer_host = num_transfer.to(at::kCPU).contiguous();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t count = num_transfer_host.data_ptr<int64_t>()[b];
    TORCH_CHECK_VALUE(count >= 0, "remask_step: num_transfer must be >= 0, got ", count, " in row ",
                      b);
  }

  if (window.has_value()) {
    const at::Tensor& w = *window;
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == batch && w.size(1) == 2,
                      "remask_step: window must be (B, 2) = (", batch, ", 2), got shape ",
                      w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == at::kLong, "remask_step: window must be int64, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == logits.device(),
                      "remask_step: window must be on the logits' device ", logits.device(),
                      ", got ", w.device());
    const at::Tensor window_host = w.to(at::kCPU).contiguous();
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t start = window_host.data_ptr<int64_t>()[2 * b];
      const int64_t end = window_host.data_ptr<int64_t>()[2 * b + 1];
      TORCH_CHECK_VALUE(0 <= start && start <= end && end <= length,
                        "remask_step: window rows must satisfy 0 <= start <= end <= L = ", length,
                        ", got [", start, ", ", end, ") in row ", b);
    }
    call.window = w.contiguous();
  }
  call.logits = logits.stride(2) == 1 ? logits : logits.contiguous();
  call.num_transfer = num_transfer.contiguous();
  call.x_new = at::empty(x.sizes(), x.options());
  call.transferred = at::empty(x.sizes(), x.options().dtype(at::kBool));
  call.confidence = at::empty(x.sizes(), x.options().dtype(at::kFloat));

  RemaskStepParams& params = call.params;
  params.logits = call.logits.data_ptr();
  params.logits_type = dtype == at::kFloat  ? LogitsType::kFloat32
                       : dtype == at::kHalf ? LogitsType::kFloat16
                                            : LogitsType::kBFloat16;
  params.batch = batch;
  params.length = length;
  params.vocab = vocab;
  params.logits_stride_b = call.logits.stride(0);
  params.logits_stride_l = call.logits.stride(1);
  params.x = x.data_ptr<int64_t>();
  params.x_stride_b = x.stride(0);
  params.x_stride_l = x.stride(1);
  params.mask_id = mask_id;
  params.num_transfer = call.num_transfer.data_ptr<int64_t>();
  params.window = call.window.defined() ? call.window.data_ptr<int64_t>() : nullptr;
  params.strategy = parse_strategy(strategy);
  params.inv_temperature = temperature > 0.0 ? static_cast<float>(1.0 / temperature) : 0.0f;
  params.has_threshold = threshold.has_value();
  params.threshold = threshold.has_value() ? static_cast<float>(*threshold) : 0.0f;
  params.seed = static_cast<uint64_t>(seed);
  params.offset = static_cast<uint32_t>(offset);
  params.x_new = call.x_new.data_ptr<int64_t>();
  params.transferred = call.transferred.data_ptr<bool>();
  params.confidence = call.confidence.data_ptr<float>();
  return call;
}

void check_defined_distributions(const RemaskStepCall& call) {
  const at::Tensor undefined = call.confidence.isnan();
  if (!undefined.any().item<bool>()) return;
  const at::Tensor where = undefined.nonzero().cpu();
  TORCH_CHECK_VALUE(false,
                    "remask_step: logits must be free of NaN and have an entry above -inf at "
                    "every position to fill; position (b=",
                    where[0][0].item<int64_t>(), ", l=", where[0][1].item<int64_t>(),
                    ") has a NaN or only -inf (", where.size(0), " such positions)");
}

namespace {

void at_parallel_for(int64_t begin, int64_t end, int64_t grain,
                     const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(begin, end, grain, body);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> remask_step_cpu_impl(
    const at::Tensor& logits, const at::Tensor& x, int64_t mask_id, const at::Tensor& num_transfer,
    const std::optional<at::Tensor>& window, const std::string& strategy, double temperature,
    std::optional<double> threshold, int64_t seed, int64_t offset) {
  RemaskStepCall call = prepare_remask_step(logits, x, mask_id, num_transfer, window, strategy,
                                            temperature, threshold, seed, offset);
  if (x.numel() > 0) remask_step_cpu(call.params, at_parallel_for);
  check_defined_distributions(call);
  return {call.x_new, call.transferred, call.confidence};
}

std::tuple<at::Tensor, at::Tensor> remask_step_noise_impl(int64_t seed, int64_t offset,
                                                          int64_t batch, int64_t length,
                                                          int64_t vocab) {
  TORCH_CHECK_VALUE(batch >= 0 && length >= 0 && vocab >= 0,
                    "remask_step_noise: batch, length and vocab must be >= 0, got ", batch, ", ",
                    length, ", ", vocab);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= std::numeric_limits<uint32_t>::max(),
                    "remask_step_noise: offset must be in [0, 2^32), got ", offset);
  at::Tensor gumbel = at::empty({batch, length, vocab}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor uniform = at::empty({batch, length}, at::TensorOptions().dtype(at::kFloat));
  remask_step_noise_cpu(static_cast<uint64_t>(seed), static_cast<uint32_t>(offset), batch, length,
                        vocab, gumbel.data_ptr<float>(), uniform.data_ptr<float>(),
                        at_parallel_for);
  return {gumbel, uniform};
}

}  // namespace
}  // namespace remask
}  // namespace sinkdlm

TORCH_LIBRARY_FRAGMENT(sinkdlm, m) {
  m.def(
      "remask_step(Tensor logits, Tensor x, int mask_id, Tensor num_transfer, Tensor? window, "
      "str strategy, float temperature, float? threshold, int seed, int offset) -> "
      "(Tensor x_new, Tensor transferred, Tensor confidence)");
  m.def(
      "remask_step_noise(int seed, int offset, int batch, int length, int vocab) -> "
      "(Tensor gumbel, Tensor uniform)");
}

// No tensor inputs to dispatch on: one kernel for every backend, producing CPU tensors.
TORCH_LIBRARY_IMPL(sinkdlm, CompositeExplicitAutograd, m) {
  m.impl("remask_step_noise", &sinkdlm::remask::remask_step_noise_impl);
}

TORCH_LIBRARY_IMPL(sinkdlm, CPU, m) {
  m.impl("remask_step", &sinkdlm::remask::remask_step_cpu_impl);
}
