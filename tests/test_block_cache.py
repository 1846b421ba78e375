"""generate(cache="prefix" | "dual") against an independent Fast-dLLM-style loop, on DiffusionLM.

The loop below is written from the description of Fast-dLLM's generate_with_prefix_cache and
generate_with_dual_cache, with its own forward of the model (the weights of a DiffusionLM, the
sink inserted literally as a key, dense float64 attention), so it shares no code with sinkdlm's
cache: at each block start one full forward keeps every layer's K/V; the block's later steps feed
the block and the suffix ("prefix": keys = kept prefix, then the fresh keys) or the block alone
("dual": the kept keys with the block's rows replaced by the fresh ones).
"""

import math

import pytest
import torch

import sinkdlm
from sinkdlm.block_cache import BlockKVCache
from sinkdlm.models import DiffusionLM, variant_config
from sinkdlm.models.transformer import apply_rope, rope_cos_sin

VOCAB, MASK_ID, PAD_ID = 41, 40, 0


class NeverMask(DiffusionLM):
    """Like a trained DLM, never predicts the mask token (a filled position stays filled)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits[..., MASK_ID] = -1e4
        return out


def tiny_model(variant="sink1", seed=0, **overrides):
    torch.manual_seed(seed)
    size = dict(vocab_size=VOCAB, mask_id=MASK_ID, d_model=32, n_layers=2, n_heads=4)
    cfg = variant_config(variant, **{**size, "n_kv_heads": 2, "init_std": 0.2, **overrides})
    model = NeverMask(cfg).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # confident predictions, so thresholds bite
    return model


# ---- the independent reference ------------------------------------------------------------


def written_out_forward(model, ids, positions, key_real, kept=None, mode=None, query_start=0):
    """DiffusionLM's forward written out, optionally against kept K/V the Fast-dLLM way.

    ids (B, Lq) at ``positions``; key_real (B, T) bool over the whole sequence. Without ``kept``
    the keys are the fed tokens (Lq = T). With ``kept`` (per layer (K, V), (B, Hkv, T, D)):
    "prefix" attends to cat(kept[:, :, :query_start], fresh), "dual" to kept with rows
    [query_start, query_start + Lq) replaced by the fresh ones. Returns (logits, fresh K/V).
    """
    cfg = model.config
    b, n = ids.shape
    total = key_real.shape[1]
    h, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = model.embed(ids)
    cos, sin = rope_cos_sin(positions, hd, cfg.rope_theta)
    s = cfg.sink_token_count
    sink_h = model.sink_embedding.to(x.dtype) if s else None
    if s:
        sink_cos, sink_sin = rope_cos_sin(torch.tensor(model.sink_positions(total)), hd, 1e4)
    fresh = []
    for layer, blk in enumerate(model.layers):
        att = blk.attn
        xn = blk.attn_norm(x)
        q = apply_rope(att.q_proj(xn).view(b, n, h, hd).transpose(1, 2), cos, sin)
        k = apply_rope(att.k_proj(xn).view(b, n, hkv, hd).transpose(1, 2), cos, sin)
        v = att.v_proj(xn).view(b, n, hkv, hd).transpose(1, 2)
        fresh.append((k, v))
        if kept is None:
            keys, values = k, v
        elif mode == "prefix":
            keys = torch.cat([kept[layer][0][:, :, :query_start], k], dim=2)
            values = torch.cat([kept[layer][1][:, :, :query_start], v], dim=2)
        else:
            keys, values = kept[layer][0].clone(), kept[layer][1].clone()
            keys[:, :, query_start : query_start + n] = k
            values[:, :, query_start : query_start + n] = v
        visible = key_real
        if s:  # the sink tokens: keys every query sees; each attends only to itself
            sn = blk.attn_norm(sink_h)
            sk = apply_rope(att.k_proj(sn).view(s, hkv, hd).transpose(0, 1), sink_cos, sink_sin)
            sv = att.v_proj(sn).view(s, hkv, hd).transpose(0, 1)
            keys = torch.cat([sk.expand(b, -1, -1, -1), keys], dim=2)
            values = torch.cat([sv.expand(b, -1, -1, -1), values], dim=2)
            visible = torch.cat([torch.ones(b, s, dtype=torch.bool), key_real], dim=1)
            own = sv.transpose(0, 1).repeat_interleave(h // hkv, dim=1).reshape(s, h * hd)
            sink_h = sink_h + att.o_proj(own)
            sink_h = sink_h + blk.mlp(blk.mlp_norm(sink_h))
        keys = keys.repeat_interleave(h // hkv, dim=1)
        values = values.repeat_interleave(h // hkv, dim=1)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        o = (scores.softmax(-1) @ values).transpose(1, 2).reshape(b, n, h * hd)
        x = x + att.o_proj(o)
        x = x + blk.mlp(blk.mlp_norm(x))
    logits = model.lm_head(model.norm(x))
    logits[..., MASK_ID] = -1e4
    return logits, fresh


def fast_dllm_loop(
    model,
    prompt,
    mask,
    gen_length,
    block_length,
    steps,
    mode,
    threshold=None,
    cfg_scale=0.0,
    shift=False,
    schedule="llada",
):
    """Fast-dLLM's sampler (low_confidence, temperature 0): per block, a full forward keeps the
    K/V, then cached steps until the block has no mask. With ``shift`` block position i reads the
    hidden state of i - 1 (the queries start one earlier). ``schedule``: LLaDA's counts (the
    block spread evenly, the first steps taking the remainder) or Dream's (step t -> s fills
    int(n (1 - s / t)) of the n still masked, timesteps linspace(1, 1e-3) in float32)."""
    batch, prompt_length = prompt.shape
    total = prompt_length + gen_length
    x = torch.full((batch, total), MASK_ID, dtype=torch.long)
    x[:, :prompt_length] = prompt
    real = torch.ones(batch, total, dtype=torch.bool)
    if mask is not None:
        real[:, :prompt_length] = mask.bool()
    is_prompt = torch.zeros(batch, total, dtype=torch.bool)
    is_prompt[:, :prompt_length] = real[:, :prompt_length]
    steps_per_block = steps // (gen_length // block_length)
    calls = 0
    for start in range(prompt_length, total, block_length):
        end = start + block_length
        if schedule == "llada":
            counts = [
                block_length // steps_per_block + (j < block_length % steps_per_block)
                for j in range(steps_per_block)
            ]
        else:
            t = torch.linspace(1.0, 1e-3, steps_per_block + 1, dtype=torch.float32)
            counts, left = [], block_length
            for j in range(steps_per_block):
                last = j == steps_per_block - 1
                counts.append(left if last else int(left * (1 - t[j + 1] / t[j])))
                left -= counts[-1]
        read = torch.arange(start, end)
        if shift:
            read = (read - 1).clamp_min(0)
        kept, step = None, 0
        while (x[:, start:end] == MASK_ID).any():
            tokens = x if cfg_scale == 0 else torch.cat([x, x.masked_fill(is_prompt, MASK_ID)])
            key_real = real if cfg_scale == 0 else torch.cat([real, real])
            if kept is None or mode is None:
                logits, fresh = written_out_forward(model, tokens, torch.arange(total), key_real)
                if mode is not None:
                    kept = fresh
                logits = logits[:, read]
            else:
                q0 = int(read[0])
                q1 = end if mode == "dual" else total
                logits, _ = written_out_forward(
                    model, tokens[:, q0:q1], torch.arange(q0, q1), key_real, kept, mode, q0
                )
                logits = logits[:, read - q0]
            calls += 1
            if cfg_scale > 0:
                cond, uncond = logits.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            logits = logits.float()  # what generate hands the remasking step
            probs = torch.softmax(logits.double(), dim=-1)
            for b in range(batch):
                masked = [i for i in range(block_length) if x[b, start + i] == MASK_ID]
                ranked = sorted(masked, key=lambda i: -probs[b, i].max().item())
                for rank, i in enumerate(ranked):
                    chosen = (
                        (rank == 0 or probs[b, i].max() >= threshold)
                        if threshold is not None
                        else rank < counts[step]
                    )
                    if chosen:
                        x[b, start + i] = int(logits[b, i].argmax())
            step += 1
    return x, calls


def ragged_prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, MASK_ID, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return prompts, ids, mask


class Counting:
    """A model wrapper with the block forward that counts calls and records each call's cache
    phase, fed length and logits."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def block_forward(self, tokens, attention_mask, *, cache, keep):
        logits = self.model.block_forward(tokens, attention_mask, cache=cache, keep=keep)
        phase = None if cache is None else ("refresh" if cache.refreshing else "step")
        self.calls.append((phase, tokens.shape[1], tokens.clone(), attention_mask, keep, logits))
        return logits


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sink1", "baseline", "sink2"])
@pytest.mark.parametrize("mode", [None, "prefix", "dual"])
@pytest.mark.parametrize(
    "options",
    [
        dict(gen_length=12, block_length=4, steps=12),
        dict(gen_length=12, block_length=4, steps=6),
        dict(gen_length=12, block_length=6, steps=4, threshold=0.5),
        dict(gen_length=8, block_length=4, steps=4, cfg_scale=1.0),
        dict(gen_length=8, block_length=4, steps=8, shift=True),
        dict(gen_length=16, block_length=8, steps=6, schedule="dream"),
    ],
    ids=["one_per_step", "two_per_step", "threshold", "cfg", "shift", "dream_schedule"],
)
def test_generation_equals_fast_dllm_loop(variant, mode, options):
    model = tiny_model(variant)
    _, ids, mask = ragged_prompts([5, 3])
    options = dict(options)
    shift = options.pop("shift", False)
    want, calls = fast_dllm_loop(model, ids, mask, mode=mode, shift=shift, **options)
    counting = Counting(model)
    got = sinkdlm.generate(
        counting,
        ids,
        attention_mask=mask,
        mask_id=MASK_ID,
        cache=mode,
        logits_shift=shift,
        **options,
    )
    assert (got != MASK_ID).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    phases = [c[0] for c in counting.calls]
    blocks = options["gen_length"] // options["block_length"]
    if mode is None:
        assert set(phases) == {None}
    else:
        assert phases.count("refresh") == blocks and phases[0] == "refresh"
    if "threshold" in options:
        assert len(phases) == calls  # Fast-dLLM's rule: as many steps as the loop takes


@pytest.mark.parametrize("variant", ["sink1", "baseline", "sink1_end", "sink_logit", "gate"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_first_step_of_every_block_equals_uncached(variant, mode):
    model = tiny_model(variant)
    _, ids, mask = ragged_prompts([6, 2, 4])
    counting = Counting(model)
    sinkdlm.generate(
        counting,
        ids,
        attention_mask=mask,
        gen_length=12,
        block_length=4,
        steps=6,
        mask_id=MASK_ID,
        cache=mode,
    )
    refreshes = [c for c in counting.calls if c[0] == "refresh"]
    assert len(refreshes) == 3
    for _, length, tokens, attention_mask, keep, logits in refreshes:
        assert length == ids.shape[1] + 12  # the whole sequence
        uncached = model(tokens, attention_mask).logits[:, keep]
        torch.testing.assert_close(logits, uncached, rtol=0, atol=1e-12)
    # The later steps feed the block (dual) or the block and the suffix (prefix).
    fed = {c[1] for c in counting.calls if c[0] == "step"}
    assert fed == ({4} if mode == "dual" else {12, 8, 4})


@pytest.mark.parametrize("mode", [None, "prefix", "dual"])
@pytest.mark.parametrize(
    "options",
    [
        dict(strategy="low_confidence"),
        dict(strategy="margin", cfg_scale=1.0),
        dict(threshold=0.4),
        dict(strategy="entropy", schedule="dream"),
        dict(logits_shift=True, count_floor=True, threshold=0.6),
    ],
)
@pytest.mark.parametrize("variant, lengths", [("baseline", [3, 7, 5]), ("sink1", [5, 5, 5])])
def test_batched_equals_one_by_one(mode, options, variant, lengths):
    # Sampling noise is drawn per batch row, so this holds at temperature 0. DiffusionLM's sink
    # sits at rotary position -1 whatever the padding: left-padded rows see it at another
    # offset, so sink models are batched here with prompts of one length.
    model = tiny_model(variant, seed=4)
    prompts, ids, mask = ragged_prompts(lengths, seed=5)
    kwargs = dict(gen_length=12, steps=6, block_length=4, mask_id=MASK_ID, cache=mode, **options)
    batched = sinkdlm.generate(model, ids, attention_mask=mask, **kwargs)
    width = ids.shape[1]
    for row, prompt in enumerate(prompts):
        alone = sinkdlm.generate(model, prompt[None], **kwargs)
        torch.testing.assert_close(batched[row, width:], alone[0, len(prompt) :], rtol=0, atol=0)
    assert (batched != MASK_ID).all()


def test_sliced_head_gives_the_same_tokens():
    model = tiny_model("sink1", seed=6)
    _, ids, mask = ragged_prompts([4, 6])

    def full_head(tokens, attention_mask=None):  # a plain callable: full logits every step
        return model(tokens, attention_mask).logits

    for options in (dict(), dict(threshold=0.3), dict(logits_shift=True, cfg_scale=0.5)):
        kwargs = dict(gen_length=12, steps=12, block_length=4, mask_id=MASK_ID, **options)
        sliced = sinkdlm.generate(model, ids, attention_mask=mask, **kwargs)
        full = sinkdlm.generate(full_head, ids, attention_mask=mask, **kwargs)
        torch.testing.assert_close(sliced, full, rtol=0, atol=0)
    logits = model(ids, mask, logits_to_keep=torch.tensor([1, 3])).logits
    torch.testing.assert_close(logits, model(ids, mask).logits[:, [1, 3]], rtol=0, atol=1e-12)


def test_sink_row_is_used_and_never_refreshed_away(monkeypatch):
    model = tiny_model("sink1", seed=7)
    _, ids, mask = ragged_prompts([5, 3])
    sink_passes = []
    original = type(model.layers[0].attn)._sink_kv

    def counted(self, *args):
        sink_passes.append(self.layer)
        return original(self, *args)

    monkeypatch.setattr(type(model.layers[0].attn), "_sink_kv", counted)
    caches = []

    class Keep(Counting):
        def block_forward(self, tokens, attention_mask, *, cache, keep):
            caches.append((cache, None if cache.sink_kv is None else dict(cache.sink_kv)))
            return super().block_forward(tokens, attention_mask, cache=cache, keep=keep)

    sinkdlm.generate(
        Keep(model),
        ids,
        attention_mask=mask,
        gen_length=12,
        block_length=4,
        steps=6,
        mask_id=MASK_ID,
        cache="dual",
    )
    cache = caches[0][0]
    assert all(c is cache for c, _ in caches)
    assert sink_passes == [0, 1]  # one sink pass per layer for the whole call
    first = caches[1][1]  # what the first forward stored
    for layer, (sink_k, sink_v) in cache.sink_kv.items():
        assert sink_k is first[layer][0] and sink_v is first[layer][1]
    # ... and the cached steps read it: without it a step's logits change.
    kv = BlockKVCache("dual")
    total = ids.shape[1] + 4
    x = torch.cat([ids, torch.full((2, 4), MASK_ID)], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    kv.refresh(total)
    model(x, full_mask, cache=kv)
    kv.step(ids.shape[1], total)
    with_sink = model(x[:, ids.shape[1] :], full_mask, cache=kv).logits
    kv.sink_kv = {
        layer: tuple(torch.zeros_like(t) for t in kv_) for layer, kv_ in kv.sink_kv.items()
    }
    zeroed = model(x[:, ids.shape[1] :], full_mask, cache=kv).logits
    assert (with_sink - zeroed).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_temperature_is_reproducible_and_progress_runs(mode):
    model = tiny_model("sink1", seed=8)
    _, ids, mask = ragged_prompts([4, 2])
    kwargs = dict(
        gen_length=8,
        steps=8,
        block_length=4,
        mask_id=MASK_ID,
        temperature=1.0,
        progress=True,
        cache=mode,
        attention_mask=mask,
    )
    first = sinkdlm.generate(model, ids, generator=torch.Generator().manual_seed(1), **kwargs)
    again = sinkdlm.generate(model, ids, generator=torch.Generator().manual_seed(1), **kwargs)
    other = sinkdlm.generate(model, ids, generator=torch.Generator().manual_seed(2), **kwargs)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("mode", [None, "prefix", "dual"])
def test_threshold_ends_when_the_model_predicts_the_mask(mode):
    # Filling a position with the mask token leaves it masked: Fast-dLLM's "until the block is
    # full" would loop forever; generate stops after one step per position, as the schedule does.
    class PredictsMask(DiffusionLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[..., MASK_ID] = 1e4
            return out

    torch.manual_seed(0)
    size = dict(vocab_size=VOCAB, mask_id=MASK_ID, d_model=16, n_layers=1, n_heads=2)
    counting = Counting(PredictsMask(variant_config("sink1", **size)).double().eval())
    prompt = torch.randint(1, MASK_ID, (2, 3))
    kwargs = dict(gen_length=8, steps=4, block_length=4, mask_id=MASK_ID, cache=mode)
    out = sinkdlm.generate(counting, prompt, threshold=0.9, **kwargs)
    assert (out[:, 3:] == MASK_ID).all() and len(counting.calls) == 8
    counting.calls = []
    plain = sinkdlm.generate(counting, prompt, **kwargs)
    assert torch.equal(out, plain) and len(counting.calls) == 4


def test_incompatible_combinations_raise():
    def plain(tokens, attention_mask=None):
        return torch.zeros(tokens.shape[0], tokens.shape[1], VOCAB)

    prompt = torch.ones(1, 3, dtype=torch.long)
    kwargs = dict(gen_length=4, steps=4, mask_id=MASK_ID)
    with pytest.raises(TypeError, match="needs a model with sinkdlm's block forward"):
        sinkdlm.generate(plain, prompt, cache="dual", **kwargs)
    with pytest.raises(ValueError, match="cache must be None, 'prefix' or 'dual'"):
        sinkdlm.generate(tiny_model(), prompt, cache="full", **kwargs)


def test_block_kv_cache_checks():
    kv = BlockKVCache("prefix")
    with pytest.raises(RuntimeError, match="empty"):
        kv.step(0, 1)
    kv.refresh(6)
    k = torch.randn(1, 2, 6, 4)
    out = kv.update(0, k, k + 1)
    assert out[0] is k and kv.keys[0] is not k  # returned as given, stored as a copy
    with pytest.raises(ValueError, match="must feed all 6 tokens"):
        kv.update(1, k[:, :, :3], k[:, :, :3])
    kv.step(2, 6)
    fresh = torch.randn(1, 2, 4, 4)
    keys, values = kv.update(0, fresh, fresh)
    assert torch.equal(keys[:, :, 2:], fresh) and torch.equal(keys[:, :, :2], k[:, :, :2])
    with pytest.raises(ValueError, match="expected"):
        kv.update(0, fresh[:, :, :3], fresh[:, :, :3])
    with pytest.raises(ValueError, match="query_start < query_end"):
        kv.step(4, 4)
    with pytest.raises(ValueError, match="mode must be"):
        BlockKVCache("full")
