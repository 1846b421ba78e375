// sinkdlm::remask_step: schema, argument checks and the CPU implementation (the core lives in
// remask_step_cpu.cpp, torch-free).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/torch_interop.h"
#include "remask/remask_step_args.h"
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

RemaskStepParams make_remask_step_params(const at::Tensor& logits, const at::Tensor& x,
                                         int64_t mask_id, const at::Tensor& num_transfer,
                                         const std::optional<at::Tensor>& window,
                                         const std::string& strategy, double temperature,
                                         std::optional<double> threshold, int64_t seed,
                                         int64_t offset, std::vector<at::Tensor>& keep) {
  RemaskStepParams params;
  TORCH_CHECK_VALUE(logits.dim() == 3, "remask_step: logits must be (B, L, V), got shape ",
                    logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "remask_step: logits must be float32, float16 or bfloat16, got ", dtype);
  const int64_t batch = logits.size(0), seq_len = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK_VALUE(vocab > 0, "remask_step: logits must have a non-empty vocabulary (V > 0)");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == batch && x.size(1) == seq_len,
                    "remask_step: x must be (B, L) = (", batch, ", ", seq_len,
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
      TORCH_CHECK_VALUE(0 <= start && start <= end && end <= seq_len,
                        "remask_step: window rows must satisfy 0 <= start <= end <= L = ", seq_len,
                        ", got [", start, ", ", end, ") in row ", b);
    }
    keep.push_back(w.contiguous());
    params.window = keep.back().data_ptr<int64_t>();
  }
  const at::Tensor logits_v = logits.stride(2) == 1 ? logits : logits.contiguous();
  keep.push_back(logits_v);
  params.logits_dtype = kernel_dtype(dtype);
  params.batch = batch;
  params.seq_len = seq_len;
  params.vocab = vocab;
  params.logits = logits_v.data_ptr();
  params.logits_stride = strides2(logits_v);
  params.x = x.data_ptr<int64_t>();
  params.x_stride = strides2(x);
  params.mask_id = mask_id;
  keep.push_back(num_transfer.contiguous());
  params.num_transfer = keep.back().data_ptr<int64_t>();
  params.strategy = parse_strategy(strategy);
  params.inv_temperature = temperature > 0.0 ? static_cast<float>(1.0 / temperature) : 0.0f;
  params.has_threshold = threshold.has_value();
  params.threshold = threshold.has_value() ? static_cast<float>(*threshold) : 0.0f;
  params.seed = static_cast<uint64_t>(seed);
  params.offset = static_cast<uint32_t>(offset);
  return params;
}

void check_defined_distributions(const at::Tensor& confidence) {
  const at::Tensor undefined = confidence.isnan();
  if (!undefined.any().item<bool>()) return;
  const at::Tensor where = undefined.nonzero().cpu();
  TORCH_CHECK_VALUE(false,
                    "remask_step: logits must be free of NaN and have an entry above -inf at "
                    "every position to fill; position (b=",
                    where[0][0].item<int64_t>(), ", l=", where[0][1].item<int64_t>(),
                    ") has a NaN or only -inf (", where.size(0), " such positions)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> remask_step_outputs(const at::Tensor& x,
                                                                   RemaskStepParams& p) {
  at::Tensor x_new = at::empty(x.sizes(), x.options());
  at::Tensor transferred = at::empty(x.sizes(), x.options().dtype(at::kBool));
  at::Tensor confidence = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  p.x_new = x_new.data_ptr<int64_t>();
  p.transferred = transferred.data_ptr<bool>();
  p.confidence = confidence.data_ptr<float>();
  return {x_new, transferred, confidence};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> remask_step_cpu_impl(
    const at::Tensor& logits, const at::Tensor& x, int64_t mask_id, const at::Tensor& num_transfer,
    const std::optional<at::Tensor>& window, const std::string& strategy, double temperature,
    std::optional<double> threshold, int64_t seed, int64_t offset) {
  std::vector<at::Tensor> keep;
  RemaskStepParams p = make_remask_step_params(logits, x, mask_id, num_transfer, window, strategy,
                                               temperature, threshold, seed, offset, keep);
  auto outputs = remask_step_outputs(x, p);
  if (x.numel() > 0) remask_step_cpu(p, torch_cpu_context());
  check_defined_distributions(std::get<2>(outputs));
  return outputs;
}

std::tuple<at::Tensor, at::Tensor> remask_step_noise_impl(int64_t seed, int64_t offset,
                                                          int64_t batch, int64_t seq_len,
                                                          int64_t vocab) {
  TORCH_CHECK_VALUE(batch >= 0 && seq_len >= 0 && vocab >= 0,
                    "remask_step_noise: batch, length and vocab must be >= 0, got ", batch, ", ",
                    seq_len, ", ", vocab);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= std::numeric_limits<uint32_t>::max(),
                    "remask_step_noise: offset must be in [0, 2^32), got ", offset);
  at::Tensor gumbel = at::empty({batch, seq_len, vocab}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor uniform = at::empty({batch, seq_len}, at::TensorOptions().dtype(at::kFloat));
  remask_step_noise_cpu(static_cast<uint64_t>(seed), static_cast<uint32_t>(offset), batch, seq_len,
                        vocab, gumbel.data_ptr<float>(), uniform.data_ptr<float>(),
                        torch_cpu_context());
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
