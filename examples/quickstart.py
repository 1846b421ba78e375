"""sinkdlm in one minute: sink attention equals the paper's dense-mask form, without the mask.

The paper inserts a real sink token into the sequence and masks attention so that the sink's
row sees only itself while every row sees the sink. sinkdlm takes the sink's key and value as
two small tensors instead and never builds the (L+1) x (L+1) mask. This script runs both on
the same inputs, checks they agree (output and gradients), and times each.

    python3 examples/quickstart.py [--length 1024] [--device cpu]
"""

import argparse
import time

import torch
import torch.nn.functional as F

import sinkdlm


def paper_form(q, k, v, sink_k, sink_v, position):
    """A sink token inserted at `position`, the dense sink mask, plain SDPA; sink row dropped."""
    B, H, L, D = q.shape

    def insert(x, token):
        token = token.expand(B, H, D).unsqueeze(2)
        return torch.cat([x[:, :, :position], token, x[:, :, position:]], dim=2)

    mask = sinkdlm.sink_attention_mask(L, position).to(q.device)
    out = F.scaled_dot_product_attention(
        insert(q, sink_k), insert(k, sink_k), insert(v, sink_v), attn_mask=mask
    )
    return torch.cat([out[:, :, :position], out[:, :, position + 1 :]], dim=2)


def timed(fn, reps=5):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    B, H, L, D = args.batch, args.heads, args.length, args.head_dim
    q, k, v = (torch.randn(B, H, L, D, device=args.device, requires_grad=True) for _ in range(3))
    # One sink for the whole batch: a key and a value per head.
    sink_k = torch.randn(H, D, device=args.device, requires_grad=True)
    sink_v = (0.1 * torch.randn(H, D, device=args.device)).requires_grad_()  # sinks: low-norm V

    ours = sinkdlm.sink_attention(q, k, v, sink_k, sink_v)
    theirs = paper_form(q, k, v, sink_k, sink_v, position=L // 2)
    grad = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, (q, k, v, sink_k, sink_v), grad)
    g_theirs = torch.autograd.grad(theirs, (q, k, v, sink_k, sink_v), grad)

    print(
        f"q {tuple(q.shape)}, k/v {tuple(k.shape)}, sink k/v {tuple(sink_k.shape)}, "
        f"{args.device}, float32"
    )
    print(f"max |out difference|              {(ours - theirs).abs().max().item():.2e}")
    for name, a, b in zip(("q", "k", "v", "sink_k", "sink_v"), g_ours, g_theirs, strict=True):
        print(f"max |d{name:6} difference|          {(a - b).abs().max().item():.2e}")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        t_ours = timed(lambda: sinkdlm.sink_attention(q, k, v, sink_k, sink_v))
        t_theirs = timed(lambda: paper_form(q, k, v, sink_k, sink_v, L // 2))
    print(
        f"forward: sinkdlm {1e3 * t_ours:.1f} ms, dense-mask SDPA {1e3 * t_theirs:.1f} ms "
        f"({t_theirs / t_ours:.2f}x)"
    )
    print("same numbers: OK")


if __name__ == "__main__":
    main()
