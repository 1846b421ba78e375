// Sink attention composed from ATen's fused attention and the sink merge (see
// sink_attention_composed.h), and torch.ops.sinkdlm.sink_attention_composed_{fwd,bwd}: the same
// schema as sink_attention_{fwd,bwd}, registered for the CPU here (and for CUDA in
// sink_attention_ops_cuda.cpp, which also makes it the CUDA kernel of sink_attention_{fwd,bwd}).
//
// Which fused attention runs over the real keys:
//   CPU   at::_scaled_dot_product_flash_attention_for_cpu (and its _backward): every dtype, any
//         head dim, GQA without repeating K/V, key padding as an additive (B, 1, 1, L) bias that
//         the kernel broadcasts (stride 0): O(B L) memory, no L x L buffer.
//   CUDA  the backend scaled_dot_product_attention itself would pick, asked with
//         at::_fused_sdp_choice (so torch.nn.attention.sdpa_kernel(...) steers it too): flash,
//         memory-efficient or cuDNN. Head dims are zero-padded to a multiple of 8 (as SDPA does).
//         GQA is passed through where the chosen backend takes it (flash, cuDNN), else K/V are
//         repeated per query head and dk/dv summed back. Key padding is the same broadcast bias,
//         which rules flash out (flash takes no mask), as it does for SDPA. float64: none of the
//         three has a kernel, so it is refused with a TypeError.
// A gradient through the returned lse: ATen's backwards take no dlse, but dS_ij gains
// P_ij * dlse_i, which is what a value column of ones and a dO column equal to dlse give (with
// that column of out set to 0, rowsum(dO * out) is unchanged). So the backward runs once at head
// dim D + 1 (rounded up to 8 on CUDA): exact, at the cost of the wider copies.
// Packed rows (segment_ids): on the CPU a dense (B, 1, L, L) bias instead of the key bias (the
// CPU flash kernel has no varlen form; O(B L^2) memory, fine for a reference path: the native
// kernel is the CPU's fast one); on CUDA flash attention's varlen form (at::_flash_attention_
// forward / _backward with cumulative sequence starts), one sequence per document, in float16 and
// bfloat16; float32 there takes the dense bias too.
#include <ATen/Parallel.h>
#include <ATen/SDPBackend.h>
#include <ATen/ops/_flash_attention_backward.h>
#include <ATen/ops/_flash_attention_forward.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <ATen/ops/_scaled_dot_product_cudnn_attention.h>
#include <ATen/ops/_scaled_dot_product_cudnn_attention_backward.h>
#include <ATen/ops/_scaled_dot_product_efficient_attention.h>
#include <ATen/ops/_scaled_dot_product_efficient_attention_backward.h>
#include <ATen/ops/_scaled_dot_product_flash_attention.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_backward.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common/cpu_context.h"
#include "common/torch_interop.h"
#include "sink_attention/sink_attention_args.h"
#include "sink_attention/sink_attention_composed.h"
#include "sink_attention/sink_merge_cpu.h"

namespace sinkdlm::composed {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

enum class Backend { kCpuFlash, kFlash, kEfficient, kCudnn };

// How one call runs the fused attention.
struct Plan {
  Backend backend;
  bool repeat_kv;  // the backend takes no GQA: K/V repeated per query head
};

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// x (B, H, L, D) zero-padded to `width` columns; column D set to `column` ((B, H, L), or the
// scalar 1 when `ones`) if given. Returns x itself (unit last stride) when nothing changes.
at::Tensor widen(const at::Tensor& x, int64_t width, const at::Tensor& column = {},
                 bool ones = false) {
  const int64_t D = x.size(3);
  if (width == D) return unit_last_stride(x);
  at::Tensor y = at::zeros({x.size(0), x.size(2), x.size(1), width}, x.options()).transpose(1, 2);
  y.narrow(3, 0, D).copy_(x);
  if (ones) y.select(3, D).fill_(1);
  if (column.defined()) y.select(3, D).copy_(column);
  return y;
}

// Key padding as an additive bias: 0 for real keys, -inf for padding, shaped (B, 1, 1, L) for the
// kernels to broadcast. On CUDA its rows start 16-element aligned, as the memory-efficient kernel
// needs.
at::Tensor key_bias(const at::Tensor& key_padding_mask, at::ScalarType dtype, bool cuda) {
  const int64_t B = key_padding_mask.size(0), L = key_padding_mask.size(1);
  at::Tensor bias =
      at::zeros({B, 1, 1, cuda ? round_up(L, 16) : L}, key_padding_mask.options().dtype(dtype))
          .narrow(3, 0, L);
  bias.masked_fill_(key_padding_mask.logical_not().view({B, 1, 1, L}), -kInf);
  return bias;
}

// Key padding and segments (packed rows) as a dense (B, 1, L, L) bias: 0 where query i may see
// key j (same segment, real key), -inf elsewhere. For the fused kernels without a varlen form
// (the CPU's flash; float32 on CUDA): O(B L^2) memory. Rows 16-element aligned on CUDA.
at::Tensor segment_bias(const at::Tensor& segment_ids,
                        const std::optional<at::Tensor>& key_padding_mask, at::ScalarType dtype,
                        bool cuda) {
  const at::Tensor ids = segment_ids.to(at::kLong);
  const int64_t B = ids.size(0), L = ids.size(1);
  at::Tensor visible = ids.unsqueeze(2).eq(ids.unsqueeze(1));
  if (key_padding_mask) visible = visible.logical_and(key_padding_mask->unsqueeze(1));
  at::Tensor bias =
      at::zeros({B, 1, L, cuda ? round_up(L, 16) : L}, ids.options().dtype(dtype)).narrow(3, 0, L);
  return bias.masked_fill_(visible.logical_not().unsqueeze(1), -kInf);
}

// What masks the fused attention when it is not the varlen form: the key padding bias, or the
// dense segment bias. Undefined: nothing to mask.
at::Tensor attention_bias(const at::Tensor& q, const std::optional<at::Tensor>& key_padding_mask,
                          const std::optional<at::Tensor>& segment_ids) {
  if (segment_ids)
    return segment_bias(*segment_ids, key_padding_mask, q.scalar_type(), q.is_cuda());
  return key_padding_mask ? key_bias(*key_padding_mask, q.scalar_type(), q.is_cuda())
                          : at::Tensor();
}

// Packed rows take flash attention's varlen form on CUDA in the dtypes flash takes (float16,
// bfloat16); float32 takes the dense bias through the memory-efficient kernel.
bool use_varlen(const at::Tensor& q, const std::optional<at::Tensor>& segment_ids) {
  return segment_ids && q.is_cuda() &&
         (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16);
}

// Packed rows on CUDA: flash attention's varlen form over the tokens laid out token-major,
// ((B L), H, W), one sequence per (row, segment); the keys gathered down to the real ones, so
// that key padding needs no mask.
struct Varlen {
  at::Tensor cu_q, cu_k;  // int32 (sequences + 1,): where each sequence starts
  int64_t max_q = 0, max_k = 0;
  at::Tensor key_index;  // int64: the real keys among the B L tokens; undefined without padding
};

Varlen make_varlen(const at::Tensor& segment_ids,
                   const std::optional<at::Tensor>& key_padding_mask) {
  const int64_t B = segment_ids.size(0), L = segment_ids.size(1);
  const at::Tensor ids = segment_ids.to(at::kLong);
  // A sequence starts at each row's first token and wherever the id changes.
  at::Tensor starts = at::ones({B, L}, ids.options().dtype(at::kBool));
  if (L > 1) starts.narrow(1, 1, L - 1).copy_(ids.narrow(1, 1, L - 1).ne(ids.narrow(1, 0, L - 1)));
  const at::Tensor sequence = starts.flatten().cumsum(0).sub_(1);  // each token's
  const int64_t sequences = sequence.select(0, -1).item<int64_t>() + 1;
  const auto starts_of = [&](const at::Tensor& token_sequence, int64_t& longest) {
    const at::Tensor lengths = at::bincount(token_sequence, {}, sequences);
    longest = lengths.max().item<int64_t>();
    return at::cat({at::zeros({1}, lengths.options()), lengths.cumsum(0)}).to(at::kInt);
  };
  Varlen vl;
  vl.cu_q = starts_of(sequence, vl.max_q);
  if (key_padding_mask) {
    vl.key_index = key_padding_mask->flatten().nonzero().squeeze(1);
    vl.cu_k = starts_of(sequence.index_select(0, vl.key_index), vl.max_k);
  } else {
    vl.cu_k = vl.cu_q, vl.max_k = vl.max_q;
  }
  return vl;
}

// (B, H, L, W) -> the token-major ((B L), H, W) flash's varlen form takes.
at::Tensor tokens(const at::Tensor& x) {
  return x.transpose(1, 2).reshape({x.size(0) * x.size(2), x.size(1), x.size(3)});
}

at::Tensor varlen_keys(const Varlen& vl, const at::Tensor& x) {
  const at::Tensor t = tokens(x);
  return vl.key_index.defined() ? t.index_select(0, vl.key_index) : t;
}

// Attention over each segment's real keys: out (B, H, L, W) and its lse as a (B, H, L) view.
std::tuple<at::Tensor, at::Tensor> varlen_forward(const Varlen& vl, const at::Tensor& q,
                                                  const at::Tensor& k, const at::Tensor& v,
                                                  double scale) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), W = q.size(3);
  auto r = at::_flash_attention_forward(tokens(q), varlen_keys(vl, k), varlen_keys(vl, v), vl.cu_q,
                                        vl.cu_k, vl.max_q, vl.max_k, 0.0, false, false, scale);
  // out ((B L), H, W); lse (H, (B L)), +inf for a sequence without keys (flash's convention; the
  // merge takes -inf: nothing seen).
  at::Tensor lse = std::get<1>(r);
  lse.masked_fill_(lse.eq(kInf), -kInf);
  return {std::get<0>(r).view({B, L, H, W}).transpose(1, 2),
          lse.view({H, B, L}).permute({1, 0, 2})};
}

// Its backward fed out and lse ((B, H, L)): dq, dk, dv at width W, the padded keys' dk, dv 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward(
    const Varlen& vl, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), W = q.size(3), Hkv = k.size(1);
  const at::Tensor rng_state = at::zeros({2}, q.options().dtype(at::kUInt64));  // dropout is 0
  const at::Tensor unused = at::empty({0}, q.options());
  auto [dq, dk, dv] = at::_flash_attention_backward(
      tokens(dout), tokens(q), varlen_keys(vl, k), varlen_keys(vl, v), tokens(out),
      lse.permute({1, 0, 2}).reshape({H, B * L}).contiguous(), vl.cu_q, vl.cu_k, vl.max_q, vl.max_k,
      0.0, false, rng_state, unused, scale);
  const auto per_token = [&](const at::Tensor& g) {
    if (!vl.key_index.defined()) return g;
    return at::zeros({B * L, Hkv, W}, g.options()).index_copy_(0, vl.key_index, g);
  };
  return {dq.view({B, L, H, W}).transpose(1, 2), per_token(dk).view({B, L, Hkv, W}).transpose(1, 2),
          per_token(dv).view({B, L, Hkv, W}).transpose(1, 2)};
}

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The CUDA rule: what SDPA would run for these (already padded) inputs. With GQA, when no fused
// backend takes the grouped heads, ask again as if K/V were repeated (q stands in for them: the
// choice reads only shapes, strides and dtypes).
Plan plan_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& bias, double scale) {
  TORCH_CHECK_TYPE(q.scalar_type() != at::kDouble,
                   "sink_attention: float64 has no fused attention kernel on CUDA (flash, "
                   "memory-efficient and cuDNN take float32/float16/bfloat16); use one of those, "
                   "or run float64 on the CPU");
  const bool gqa = q.size(1) != k.size(1);
  const auto choose = [&](const at::Tensor& kk, const at::Tensor& vv, bool enable_gqa) {
    return static_cast<at::SDPBackend>(
        at::_fused_sdp_choice(q, kk, vv, optional(bias), 0.0, false, scale, enable_gqa));
  };
  const auto fused = [](at::SDPBackend b) {
    return b == at::SDPBackend::flash_attention || b == at::SDPBackend::efficient_attention ||
           b == at::SDPBackend::cudnn_attention;
  };
  at::SDPBackend choice = choose(k, v, gqa);
  bool repeat = false;
  if (gqa && !fused(choice)) {
    choice = choose(q, q, false);
    repeat = true;
  }
  switch (choice) {
    case at::SDPBackend::flash_attention:
      return {Backend::kFlash, repeat};
    case at::SDPBackend::efficient_attention:
      return {Backend::kEfficient, gqa};  // its kernel needs as many K/V heads as query heads
    case at::SDPBackend::cudnn_attention:
      return {Backend::kCudnn, repeat};
    default:
      TORCH_CHECK(false,
                  "sink_attention: no fused attention kernel (flash, memory-efficient, "
                  "cuDNN) takes these inputs on ",
                  q.device(), " (", q.scalar_type(), ", head_dim ", q.size(3),
                  "); scaled_dot_product_attention would fall back to its L x L math kernel. "
                  "Enable a fused backend (torch.nn.attention.sdpa_kernel) or change dtype");
  }
}

Plan make_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& bias, double scale) {
  if (q.is_cpu()) return {Backend::kCpuFlash, false};
  TORCH_CHECK(q.is_cuda(), "sink_attention: the composed path runs on CPU or CUDA, got ",
              q.device());
  return plan_cuda(q, k, v, bias, scale);
}

// The head dim the backend sees: D, plus the dlse column, rounded up to 8 on CUDA.
int64_t backend_width(const at::Tensor& q, bool dlse_column) {
  const int64_t w = q.size(3) + (dlse_column ? 1 : 0);
  return q.is_cpu() ? w : round_up(w, 8);
}

at::Tensor repeat_heads(const at::Tensor& x, int64_t heads) {
  return x.size(1) == heads ? x : x.repeat_interleave(heads / x.size(1), 1);
}

// Sums dk / dv of repeated heads back to the K/V heads.
at::Tensor sum_heads(const at::Tensor& g, int64_t kv_heads) {
  if (g.size(1) == kv_heads) return g;
  return g.unflatten(1, {kv_heads, g.size(1) / kv_heads}).sum(2);
}

// The bias as each backend takes it: CPU and cuDNN broadcast (B, 1, 1, Lk) themselves; the
// memory-efficient kernel gets the (B, H, Lq, Lk) view with stride 0 (what SDPA passes it).
at::Tensor bias_for(Backend b, const at::Tensor& bias, int64_t H, int64_t Lq) {
  if (!bias.defined() || b != Backend::kEfficient) return bias;
  return bias.expand({bias.size(0), H, Lq, bias.size(3)});
}

at::Tensor no_rng() { return at::empty({}, at::dtype(at::kLong)); }  // dropout is 0

// Attention over the real keys: out (B, H, Lq, W) and its lse as a (B, H, Lq) view.
std::tuple<at::Tensor, at::Tensor> fused_forward(const Plan& plan, const at::Tensor& q,
                                                 const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& bias, double scale) {
  const int64_t H = q.size(1), L = q.size(2);
  const at::Tensor kk = plan.repeat_kv ? repeat_heads(k, H) : k;
  const at::Tensor vv = plan.repeat_kv ? repeat_heads(v, H) : v;
  const at::Tensor b = bias_for(plan.backend, bias, H, L);
  switch (plan.backend) {
    case Backend::kCpuFlash:
      return at::_scaled_dot_product_flash_attention_for_cpu(q, kk, vv, 0.0, false, optional(b),
                                                             scale);
    case Backend::kFlash: {
      auto r = at::_scaled_dot_product_flash_attention(q, kk, vv, 0.0, false, false, scale);
      return {std::get<0>(r), std::get<1>(r)};
    }
    case Backend::kEfficient: {
      auto r = at::_scaled_dot_product_efficient_attention(q, kk, vv, optional(b), true, 0.0, false,
                                                           scale);
      return {std::get<0>(r), std::get<1>(r).narrow(2, 0, L)};  // lse rows padded to 32
    }
    case Backend::kCudnn: {
      auto r = at::_scaled_dot_product_cudnn_attention(q, kk, vv, optional(b), true, 0.0, false,
                                                       false, scale);
      at::Tensor lse = std::get<1>(r);
      return {std::get<0>(r), lse.dim() == 4 ? lse.select(3, 0) : lse};  // (B, H, L, 1)
    }
  }
  TORCH_CHECK(false, "unreachable");
}

// The backend's backward fed out and lse ((B, H, Lq) contiguous): dq, dk, dv at width W.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const Plan& plan, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& bias,
    double scale) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Hkv = k.size(1), Lk = k.size(2);
  const at::Tensor kk = plan.repeat_kv ? repeat_heads(k, H) : k;
  const at::Tensor vv = plan.repeat_kv ? repeat_heads(v, H) : v;
  const at::Tensor b = bias_for(plan.backend, bias, H, L);
  at::Tensor dq, dk, dv;
  switch (plan.backend) {
    case Backend::kCpuFlash:
      std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          dout, q, kk, vv, out, lse, 0.0, false, optional(b), scale);
      break;
    case Backend::kFlash:
      std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_backward(
          dout, q, kk, vv, out, lse, at::Tensor(), at::Tensor(), L, Lk, 0.0, false, no_rng(),
          no_rng(), scale);
      break;
    case Backend::kEfficient: {
      at::Tensor lse_padded = at::zeros({B, H, round_up(L, 32)}, lse.options());
      lse_padded.narrow(2, 0, L).copy_(lse);
      std::tie(dq, dk, dv, std::ignore) = at::_scaled_dot_product_efficient_attention_backward(
          dout, q, kk, vv, b, out, lse_padded, no_rng(), no_rng(), 0.0, {true, true, true, false},
          false, scale);
      break;
    }
    case Backend::kCudnn: {
      // cuDNN wants dO laid out like out.
      const at::Tensor d = dout.strides() == out.strides() ? dout : at::empty_like(out).copy_(dout);
      std::tie(dq, dk, dv) = at::_scaled_dot_product_cudnn_attention_backward(
          d, q, kk, vv, out, lse.unsqueeze(-1), no_rng(), no_rng(), b, at::Tensor(), at::Tensor(),
          L, Lk, 0.0, false, scale);
      break;
    }
  }
  return {dq, sum_heads(dk, Hkv), sum_heads(dv, Hkv)};
}

// A gradient of `like` ((B, H, L, D)) laid out as the fake kernel promises, copied only if the
// backend's is not: (B, L, H, D)-major on the CPU, which is how ATen's CPU flash backward returns
// every gradient whatever the inputs' layout (a copy to the inputs' own strides would cost a pass
// over each of dq, dk and dv); empty_like(like) on CUDA.
at::Tensor grad_laid_out(const at::Tensor& grad, const at::Tensor& like) {
  const auto layout = [&](const at::TensorOptions& options) {
    if (!like.is_cpu()) return at::empty_like(like, options);
    return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, options)
        .transpose(1, 2);
  };
  if (grad.strides() == layout(like.options().device(at::kMeta)).strides()) return grad;
  return layout(like.options()).copy_(grad);
}

at::Tensor in_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t ? t->to(acc).contiguous() : at::Tensor();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sink_attention_composed_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v,
    const std::optional<at::Tensor>& sink_logit, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, double scale,
    const std::optional<at::Tensor>& segment_ids, const MergeKernels& kernels) {
  std::vector<at::Tensor> keep;  // the native op's checks (its params only give the sizes here)
  const SinkAttentionParams d =
      make_sink_attention_params(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask,
                                 query_padding_mask, segment_ids, scale, keep);
  TORCH_CHECK(d.head_dim > 0, "sink_attention: q must have a non-empty head dim, got ", q.sizes());
  const at::ScalarType acc = acc_type(q.scalar_type());
  // out takes q's layout (empty_like), as flash's does: a (B, L, H, D)-major q (a projection
  // viewed as heads) gives an out whose transpose(1, 2).reshape(B, L, H * D) is free, and the
  // merge runs in place over the backend's out whenever the layouts agree (no second buffer is
  // allocated then: an unused one costs page faults on every call once the allocator returns it).
  const auto lse_options = q.options().dtype(acc);
  if (q.numel() == 0)
    return {at::empty_like(q), at::empty({d.batch, d.heads, d.seq_len}, lse_options)};

  const int64_t width = backend_width(q, false);
  const at::Tensor qw = widen(q, width), kw = widen(k, width), vw = widen(v, width);
  at::Tensor attn_out, attn_lse;
  if (use_varlen(q, segment_ids)) {
    std::tie(attn_out, attn_lse) =
        varlen_forward(make_varlen(*segment_ids, key_padding_mask), qw, kw, vw, scale);
  } else {
    const at::Tensor bias = attention_bias(q, key_padding_mask, segment_ids);
    const Plan plan = make_plan(qw, kw, vw, bias, scale);
    std::tie(attn_out, attn_lse) = fused_forward(plan, qw, kw, vw, bias, scale);
  }
  attn_out = attn_out.narrow(3, 0, d.head_dim);

  MergeFwdArgs a;
  a.kv_heads = d.kv_heads;
  a.q = qw.narrow(3, 0, d.head_dim), a.attn_out = attn_out, a.attn_lse = attn_lse;
  a.sink_k = in_acc(sink_k, acc), a.sink_v = in_acc(sink_v, acc);
  a.sink_logit = in_acc(sink_logit, acc);
  a.row_mask = query_padding_in_force(d, key_padding_mask, query_padding_mask);
  a.scale = scale;
  const at::Tensor want = at::empty_like(q, q.options().device(at::kMeta));
  a.out = attn_out.strides() == want.strides() ? attn_out : at::empty_like(q);
  a.lse = at::empty({d.batch, d.heads, d.seq_len}, lse_options);
  kernels.fwd(a);
  return {a.out, a.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sink_attention_composed_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& sink_k,
                            const std::optional<at::Tensor>& sink_v,
                            const std::optional<at::Tensor>& sink_logit,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& query_padding_mask,
                            const at::Tensor& out, const at::Tensor& lse, double scale,
                            const std::optional<at::Tensor>& segment_ids,
                            const MergeKernels& kernels) {
  std::vector<at::Tensor> keep;  // the native op's checks (its params only give the sizes here)
  const SinkAttentionParams d =
      make_sink_attention_params(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask,
                                 query_padding_mask, segment_ids, scale, keep);
  check_sink_attention_bwd_args(d, grad_out, grad_lse, q, out, lse);
  TORCH_CHECK(d.head_dim > 0, "sink_attention: q must have a non-empty head dim, got ", q.sizes());
  const at::ScalarType acc = acc_type(q.scalar_type());
  const auto acc_opts = q.options().dtype(acc);
  at::Tensor dsink_k = sink_k ? at::zeros(sink_k->sizes(), acc_opts) : at::empty({0}, q.options());
  at::Tensor dsink_v = sink_v ? at::zeros(sink_v->sizes(), acc_opts) : at::empty({0}, q.options());
  at::Tensor dsink_logit =
      sink_logit ? at::zeros({d.heads}, acc_opts) : at::empty({0}, q.options());
  const auto to_input_dtype = [&] {
    if (sink_k) {
      dsink_k = dsink_k.to(sink_k->scalar_type());
      dsink_v = dsink_v.to(sink_v->scalar_type());
    }
    if (sink_logit) dsink_logit = dsink_logit.to(sink_logit->scalar_type());
  };
  if (q.numel() == 0) {
    to_input_dtype();
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v), dsink_k, dsink_v, dsink_logit};
  }

  // Padded rows take no part: with lse = +inf their P = exp(S - lse) is exactly 0.
  const at::Tensor row_mask = query_padding_in_force(d, key_padding_mask, query_padding_mask);
  at::Tensor lse_acc = lse.to(acc).contiguous();
  if (row_mask.defined()) lse_acc = lse_acc.masked_fill(row_mask.logical_not().unsqueeze(1), kInf);
  const at::Tensor dlse = grad_lse ? grad_lse->to(acc).contiguous() : at::Tensor();

  const int64_t width = backend_width(q, grad_lse.has_value());
  const at::Tensor qw = widen(q, width), kw = widen(k, width);
  const at::Tensor vw = widen(v, width, {}, grad_lse.has_value());
  const at::Tensor dout_w = widen(grad_out, width, grad_lse ? dlse.to(q.scalar_type()) : dlse);
  const at::Tensor out_w = widen(out, width);
  at::Tensor dq, dk, dv;
  if (use_varlen(q, segment_ids)) {
    std::tie(dq, dk, dv) = varlen_backward(make_varlen(*segment_ids, key_padding_mask), dout_w, qw,
                                           kw, vw, out_w, lse_acc, scale);
  } else {
    const at::Tensor bias = attention_bias(q, key_padding_mask, segment_ids);
    const Plan plan = make_plan(qw, kw, vw, bias, scale);
    std::tie(dq, dk, dv) = fused_backward(plan, dout_w, qw, kw, vw, out_w, lse_acc, bias, scale);
  }
  dq = dq.narrow(3, 0, d.head_dim);

  if (sink_k || sink_logit) {
    MergeBwdArgs a;
    a.kv_heads = d.kv_heads;
    a.q = qw.narrow(3, 0, d.head_dim), a.dout = dout_w.narrow(3, 0, d.head_dim);
    a.out = out_w.narrow(3, 0, d.head_dim), a.lse = lse_acc, a.dlse = dlse;
    a.sink_k = in_acc(sink_k, acc), a.sink_v = in_acc(sink_v, acc);
    a.sink_logit = in_acc(sink_logit, acc);
    a.row_mask = row_mask;
    a.scale = scale;
    a.dq = dq;
    a.dsink_k = sink_k ? dsink_k : at::Tensor(), a.dsink_v = sink_v ? dsink_v : at::Tensor();
    a.dsink_logit = sink_logit ? dsink_logit : at::Tensor();
    kernels.bwd(a);
  }
  to_input_dtype();
  return {grad_laid_out(dq, q),
          grad_laid_out(dk.narrow(3, 0, d.head_dim), k),
          grad_laid_out(dv.narrow(3, 0, d.head_dim), v),
          dsink_k,
          dsink_v,
          dsink_logit};
}

namespace {

void merge_fwd_cpu(const MergeFwdArgs& a) {
  dispatch_storage_type(a.q.scalar_type(), [&]<typename T, typename A>() {
    sink_merge_fwd_cpu(make_sink_merge_params<T, A>(a), torch_cpu_context());
  });
}

void merge_bwd_cpu(const MergeBwdArgs& a) {
  dispatch_storage_type(a.q.scalar_type(), [&]<typename T, typename A>() {
    sink_merge_bwd_cpu(make_sink_merge_bwd_params<T, A>(a), torch_cpu_context());
  });
}

constexpr MergeKernels kCpuKernels{&merge_fwd_cpu, &merge_bwd_cpu};

std::tuple<at::Tensor, at::Tensor> composed_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& sink_k, const std::optional<at::Tensor>& sink_v,
    const std::optional<at::Tensor>& sink_logit, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, double scale,
    const std::optional<at::Tensor>& segment_ids) {
  return sink_attention_composed_fwd(q, k, v, sink_k, sink_v, sink_logit, key_padding_mask,
                                     query_padding_mask, scale, segment_ids, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composed_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& sink_k,
    const std::optional<at::Tensor>& sink_v, const std::optional<at::Tensor>& sink_logit,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale, const std::optional<at::Tensor>& segment_ids) {
  return sink_attention_composed_bwd(grad_out, grad_lse, q, k, v, sink_k, sink_v, sink_logit,
                                     key_padding_mask, query_padding_mask, out, lse, scale,
                                     segment_ids, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinkdlm, m) {
  m.def(
      "sink_attention_composed_fwd(Tensor q, Tensor k, Tensor v, Tensor? sink_k, Tensor? sink_v, "
      "Tensor? sink_logit, Tensor? key_padding_mask, Tensor? query_padding_mask, float scale, "
      "Tensor? segment_ids=None) -> (Tensor out, Tensor lse)");
  m.def(
      "sink_attention_composed_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor? sink_k, Tensor? sink_v, Tensor? sink_logit, Tensor? key_padding_mask, "
      "Tensor? query_padding_mask, Tensor out, Tensor lse, float scale, Tensor? segment_ids=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dsink_k, Tensor dsink_v, Tensor dsink_logit)");
}

TORCH_LIBRARY_IMPL(sinkdlm, CPU, m) {
  m.impl("sink_attention_composed_fwd", &composed_fwd_cpu);
  m.impl("sink_attention_composed_bwd", &composed_bwd_cpu);
}

}  // namespace sinkdlm::composed
