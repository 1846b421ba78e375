"""generate(cache=...) on transformers-native models, against a Fast-dLLM-style loop built on
transformers' own DynamicCache (tiny random Llama, float64, CPU).

The loop is Fast-dLLM's sampler written with the model's own cache: at each block start a full
forward returns every layer's K/V; "prefix" puts the K/V before the block in a DynamicCache and
feeds the block and suffix at their positions; "dual" puts the K/V before and after the block in
it and feeds the block (bidirectional attention does not care about the keys' order, so the
block's fresh keys going last, with the padding mask reordered alike, is Fast-dLLM's in-place
replacement).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import count_sink_passes  # noqa: E402

import sinkdlm  # noqa: E402
import sinkdlm.hf  # noqa: E402
from sinkdlm.block_cache import BlockKVCache  # noqa: E402

VOCAB, MASK_ID, PAD_ID = 64, 63, 0


def tiny_llama(sink, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        is_causal=False,  # a bidirectional DLM without the sink token, through the model's SDPA
        initializer_range=0.2,
    )
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)  # confident predictions, so thresholds bite
        model.lm_head.weight[MASK_ID] = 0  # logit exactly 0: below the confident tokens
    if sink:
        sinkdlm.hf.add_sink_token(model)
    return model


def forward(model, tokens, mask, positions, cache=None):
    out = model(
        input_ids=tokens,
        attention_mask=mask,
        position_ids=positions.expand(tokens.shape[0], -1),
        cache=cache,
        use_cache=True,
    )
    return out.logits.float(), out.cache


def fast_dllm_loop(
    model, ids, mask, gen_length, block_length, steps, mode, threshold=None, cfg_scale=0.0
):
    batch, prompt_length = ids.shape
    total = prompt_length + gen_length
    x = torch.full((batch, total), MASK_ID, dtype=torch.long)
    x[:, :prompt_length] = ids
    real = torch.ones(batch, total, dtype=torch.long)
    real[:, :prompt_length] = mask
    is_prompt = torch.zeros(batch, total, dtype=torch.bool)
    is_prompt[:, :prompt_length] = mask.bool()
    steps_per_block = steps // (gen_length // block_length)
    for start in range(prompt_length, total, block_length):
        end = start + block_length
        counts = [
            block_length // steps_per_block + (j < block_length % steps_per_block)
            for j in range(steps_per_block)
        ]
        kept, step = None, 0
        while (x[:, start:end] == MASK_ID).any():
            tokens = x if cfg_scale == 0 else torch.cat([x, x.masked_fill(is_prompt, MASK_ID)])
            key_real = real if cfg_scale == 0 else torch.cat([real, real])
            if kept is None or mode is None:
                logits, full = forward(model, tokens, key_real, torch.arange(total))
                kept = [(layer.keys, layer.values) for layer in full.layers]
                logits = logits[:, start:end]
            else:
                cache = transformers.DynamicCache()
                if mode == "prefix":
                    rows, fed = torch.arange(start), torch.arange(start, total)
                else:
                    rows = torch.cat([torch.arange(start), torch.arange(end, total)])
                    fed = torch.arange(start, end)
                for layer, (k, v) in enumerate(kept):
                    cache.update(k[:, :, rows], v[:, :, rows], layer)
                order = torch.cat([rows, fed])
                logits, _ = forward(model, tokens[:, fed], key_real[:, order], fed, cache)
                logits = logits[:, :block_length]
            if cfg_scale > 0:
                cond, uncond = logits.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            probs = torch.softmax(logits.double(), dim=-1)
            for b in range(batch):
                masked = [i for i in range(block_length) if x[b, start + i] == MASK_ID]
                ranked = sorted(masked, key=lambda i: -probs[b, i].max().item())
                for rank, i in enumerate(ranked):
                    if threshold is not None:
                        chosen = rank == 0 or probs[b, i].max() >= threshold
                    else:
                        chosen = rank < counts[step]
                    if chosen:
                        x[b, start + i] = int(logits[b, i].argmax())
            step += 1
    return x


def ragged(lengths, seed=2):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, MASK_ID, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return prompts, ids, mask


@pytest.mark.parametrize("sink", [True, False], ids=["sink", "nosink"])
@pytest.mark.parametrize("mode", [None, "prefix", "dual"])
@pytest.mark.parametrize(
    "options",
    [
        dict(gen_length=12, block_length=4, steps=12),
        dict(gen_length=12, block_length=6, steps=4, threshold=0.5),
        dict(gen_length=8, block_length=4, steps=4, cfg_scale=1.0),
    ],
    ids=["one_per_step", "threshold", "cfg"],
)
def test_generation_equals_fast_dllm_loop(sink, mode, options):
    model = tiny_llama(sink)
    _, ids, mask = ragged([5, 3])
    want = fast_dllm_loop(model, ids, mask, mode=mode, **options)
    got = sinkdlm.generate(model, ids, attention_mask=mask, mask_id=MASK_ID, cache=mode, **options)
    assert (got != MASK_ID).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("sink", [True, False], ids=["sink", "nosink"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_first_step_of_every_block_equals_uncached(sink, mode, monkeypatch):
    model = tiny_llama(sink, seed=3)
    _, ids, mask = ragged([6, 2])
    seen = []
    finder = sinkdlm.hf.block_cache.NativeBlockForward.__call__

    def recording(self, tokens, attention_mask, *, cache, keep):
        logits = finder(self, tokens, attention_mask, cache=cache, keep=keep)
        if cache.refreshing:
            seen.append((tokens.clone(), attention_mask, keep, logits))
        return logits

    monkeypatch.setattr(sinkdlm.hf.block_cache.NativeBlockForward, "__call__", recording)
    sinkdlm.generate(
        model,
        ids,
        attention_mask=mask,
        gen_length=12,
        block_length=4,
        steps=6,
        mask_id=MASK_ID,
        cache=mode,
    )
    assert len(seen) == 3
    for tokens, attention_mask, keep, logits in seen:
        uncached = model(tokens, attention_mask=attention_mask, use_cache=False).logits
        torch.testing.assert_close(logits, uncached[:, keep], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", [None, "prefix", "dual"])
@pytest.mark.parametrize("sink, lengths", [(False, [3, 7, 5]), (True, [5, 5, 5])])
def test_batched_equals_one_by_one(mode, sink, lengths):
    # The sink sits at rotary position -1 whatever the padding, so sink models are batched here
    # with prompts of one length.
    model = tiny_llama(sink, seed=4)
    prompts, ids, mask = ragged(lengths, seed=5)
    kwargs = dict(gen_length=8, steps=4, block_length=4, mask_id=MASK_ID, cache=mode, threshold=0.3)
    batched = sinkdlm.generate(model, ids, attention_mask=mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = sinkdlm.generate(model, prompt[None], **kwargs)
        torch.testing.assert_close(
            batched[row, ids.shape[1] :], alone[0, len(prompt) :], rtol=0, atol=0
        )


def test_sink_pass_runs_once_per_call(monkeypatch):
    model = tiny_llama(True, seed=6)
    _, ids, mask = ragged([4, 4])
    passes = count_sink_passes(monkeypatch, model)
    sinkdlm.generate(
        model,
        ids,
        attention_mask=mask,
        gen_length=12,
        block_length=4,
        steps=12,
        mask_id=MASK_ID,
        cache="dual",
    )
    assert len(passes) == 1


# ---- remote-code models through their adapters (mirrors of LLaDA's and Dream's files) --------


def remote_model(family, sink, seed=0):
    from hf_mirrors.modeling_dream_mirror import DreamConfig, DreamModel
    from hf_mirrors.modeling_llada_mirror import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(seed)
    if family == "llada":
        model = LLaDAModelLM(LLaDAConfig(vocab_size=VOCAB)).double().eval()
        head = model.model.transformer.ff_out
    else:
        from sinkdlm.hf.shims import remote_code_compat

        with remote_code_compat():  # Dream's rotary looks up ROPE_INIT_FUNCTIONS["default"]
            model = DreamModel(DreamConfig(vocab_size=VOCAB)).double().eval()
        head = model.lm_head
    with torch.no_grad():
        head.weight.mul_(20)  # confident predictions
        head.weight[MASK_ID] = 0
    if sink:
        sinkdlm.hf.add_sink_token(model)
        with torch.no_grad():
            sink_weight = model.model.sink_embedding.weight
            sink_weight.copy_(
                torch.randn(sink_weight.shape, generator=torch.Generator().manual_seed(7))
            )
    return model


MODELS = {
    "llada": lambda sink: remote_model("llada", sink),
    "dream": lambda sink: remote_model("dream", sink),
    "llama": lambda sink: tiny_llama(sink),
}


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("sink", [True, False], ids=["sink", "nosink"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_step_on_unchanged_tokens_reproduces_the_refresh(family, sink, mode):
    """Right after a refresh, before any token changes, a cached step sees exactly the K/V the
    full forward saw: its logits are the refresh's, and those are the uncached forward's. This
    pins the fed tokens' positions, rotary, masks and sink under the cache."""
    model = MODELS[family](sink)
    _, ids, mask = ragged([6, 6] if family == "llada" else [6, 3])  # LLaDA ignores padding
    mask = None if family == "llada" else mask
    forward, cacheable = sinkdlm.protocol.block_forward(model)
    assert cacheable
    total, start, end = ids.shape[1] + 8, ids.shape[1] + 4, ids.shape[1] + 8
    x = torch.cat([ids, torch.randint(1, MASK_ID, (2, 4)), torch.full((2, 4), MASK_ID)], dim=1)
    full_mask = None if mask is None else torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], 1)
    keep = torch.arange(start - 2, end)
    uncached = forward(x, full_mask, cache=None, keep=keep)
    kv = BlockKVCache(mode)
    kv.refresh(total)
    refreshed = forward(x, full_mask, cache=kv, keep=keep)
    torch.testing.assert_close(refreshed, uncached, rtol=0, atol=1e-12)
    kv.step(start - 2, end if mode == "dual" else total)
    stepped = forward(x[:, start - 2 : kv.query_end], full_mask, cache=kv, keep=keep - (start - 2))
    torch.testing.assert_close(stepped, refreshed, rtol=0, atol=1e-10)
    # ... and the head only ran on the kept positions (the same logits as the full head's)
    everything = forward(x, full_mask, cache=None, keep=torch.arange(total))
    torch.testing.assert_close(uncached, everything[:, keep], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("sink", [True, False], ids=["sink", "nosink"])
@pytest.mark.parametrize("mode", [None, "prefix", "dual"])
def test_remote_code_generation(family, sink, mode):
    model = remote_model(family, sink, seed=1)
    prompts, ids, mask = ragged([5, 5, 5], seed=3)
    kwargs = dict(
        gen_length=8,
        steps=8,
        block_length=4,
        mask_id=MASK_ID,
        cache=mode,
        logits_shift=family == "dream",
    )
    batched = sinkdlm.generate(model, ids, attention_mask=mask, **kwargs)
    assert (batched != MASK_ID).all()
    for row, prompt in enumerate(prompts):
        alone = sinkdlm.generate(model, prompt[None], **kwargs)
        torch.testing.assert_close(batched[row], alone[0], rtol=0, atol=0)
    if not sink:  # the adapter is installed only for the cached forwards
        assert not any("_sinkdlm_layer" in m.__dict__ for m in model.modules())


def test_llada_prefix_equals_fast_dllm_on_llada_own_past_key_values():
    """Fast-dLLM's generate_with_prefix_cache on LLaDA itself: the full forward's
    (unrotated) K/V cut to the prefix, passed as LLaDA's past_key_values with x[:, start:]."""
    model = remote_model("llada", sink=False, seed=2)
    _, ids, _ = ragged([5, 5], seed=4)
    gen_length, block_length = 8, 4
    batch, total = 2, ids.shape[1] + gen_length
    x = torch.cat([ids, torch.full((batch, gen_length), MASK_ID)], dim=1)
    for start in range(ids.shape[1], total, block_length):
        end = start + block_length
        kept = None
        while (x[:, start:end] == MASK_ID).any():
            if kept is None:
                out = model(input_ids=x, use_cache=True)
                kept = [(k[:, :, :start], v[:, :, :start]) for k, v in out.past_key_values]
                logits = out.logits[:, start:end]
            else:
                logits = model(input_ids=x[:, start:], past_key_values=kept, use_cache=False).logits
                logits = logits[:, :block_length]
            probs = torch.softmax(logits.float().double(), dim=-1)
            for b in range(batch):
                masked = [i for i in range(block_length) if x[b, start + i] == MASK_ID]
                best = max(masked, key=lambda i: probs[b, i].max().item())
                x[b, start + best] = int(logits[b, best].argmax())
    got = sinkdlm.generate(
        model,
        ids,
        gen_length=gen_length,
        steps=gen_length,
        block_length=block_length,
        mask_id=MASK_ID,
        cache="prefix",
    )
    torch.testing.assert_close(got, x, rtol=0, atol=0)
