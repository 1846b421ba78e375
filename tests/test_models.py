import math

import pytest
import torch
import torch.nn.functional as F

from sinkdlm.models import (
    VARIANTS,
    DiffusionLM,
    DiffusionLMConfig,
    draw_masks,
    evaluate_masked_diffusion,
    load_model,
    save_model,
    smdm_loss,
    variant_config,
)
from sinkdlm.models.transformer import apply_rope, rope_cos_sin

SIZE = dict(vocab_size=37, mask_id=1, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def literal_sink_forward(model, ids, attention_mask):
    """The paper's form: sink tokens inserted into the sequence, a dense (L+S)x(L+S) mask where
    each sink sees only itself and every real token sees all sinks and all real tokens."""
    cfg = model.config
    b, n = ids.shape
    s = cfg.sink_token_count
    front = cfg.sink_position == "front"
    sink = model.sink_embedding[None].expand(b, -1, -1)
    x = torch.cat([sink, model.embed(ids)] if front else [model.embed(ids), sink], dim=1)
    pos = torch.tensor(list(range(-s, n)) if front else list(range(n + s)))
    idx = torch.arange(n + s)
    is_sink = idx < s if front else idx >= n
    text_real = torch.cat(
        [torch.zeros(b, s, dtype=torch.bool), attention_mask]
        if front
        else [attention_mask, torch.zeros(b, s, dtype=torch.bool)],
        dim=1,
    )
    # rows = queries, columns = keys
    allowed = (text_real[:, None, :] | is_sink[None, None, :]).expand(b, n + s, n + s).clone()
    allowed[:, is_sink, :] = torch.eye(n + s, dtype=torch.bool)[is_sink]  # a sink sees only itself
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
    h, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for blk in model.layers:
        att = blk.attn
        xn = blk.attn_norm(x)
        q = apply_rope(att.q_proj(xn).view(b, -1, h, hd).transpose(1, 2), cos, sin)
        k = apply_rope(att.k_proj(xn).view(b, -1, hkv, hd).transpose(1, 2), cos, sin)
        v = att.v_proj(xn).view(b, -1, hkv, hd).transpose(1, 2)
        if cfg.sink_zero_value:
            v = v.masked_fill(is_sink[None, None, :, None], 0.0)
        k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, h * hd)
        x = x + att.o_proj(o)
        x = x + blk.mlp(blk.mlp_norm(x))
    text = x[:, s:] if front else x[:, :n]
    return model.lm_head(model.norm(text))


@pytest.mark.parametrize("variant", ["sink1", "sink1_end", "sink2", "sink4", "sink1_zero_value"])
def test_sink_tokens_match_literal_inserted_tokens(variant):
    torch.manual_seed(0)
    model = DiffusionLM(variant_config(variant, **SIZE)).double()
    with torch.no_grad():
        model.sink_embedding.normal_()  # large sinks so a wrong mask shows
    ids = torch.randint(2, SIZE["vocab_size"], (3, 11))
    am = torch.ones(3, 11, dtype=torch.bool)
    am[1, 7:] = False
    am[2, 10:] = False
    got = model(ids, attention_mask=am).logits
    want = literal_sink_forward(model, ids, am)
    real = am[..., None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)


def test_no_sink_padding_invariance():
    # Padded tail tokens must not change the logits of real tokens (bidirectional attention).
    torch.manual_seed(1)
    model = DiffusionLM(variant_config("sink_logit", **SIZE)).double()
    ids = torch.randint(2, SIZE["vocab_size"], (1, 9))
    am = torch.ones(1, 9, dtype=torch.bool)
    am[0, 6:] = False
    padded = model(ids, attention_mask=am).logits[0, :6]
    trimmed = model(ids[:, :6]).logits[0]
    torch.testing.assert_close(padded, trimmed, rtol=1e-10, atol=1e-10)


def test_gate_multiplies_attention_output():
    torch.manual_seed(2)
    model = DiffusionLM(variant_config("gate", **SIZE))
    ids = torch.randint(2, SIZE["vocab_size"], (2, 8))
    base = model(ids).logits
    with torch.no_grad():  # gate -> 0 removes attention entirely
        for att in model.attention_layers():
            att.gate.bias.fill_(-1e4)
    no_attn = model(ids).logits
    assert not torch.allclose(base, no_attn)
    ref = model.embed(ids)
    for blk in model.layers:
        ref = ref + blk.mlp(blk.mlp_norm(ref))
    torch.testing.assert_close(no_attn, model.lm_head(model.norm(ref)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_trains(variant):
    torch.manual_seed(3)
    model = DiffusionLM(variant_config(variant, **SIZE))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(2, SIZE["vocab_size"], (4, 12))
    gen = torch.Generator().manual_seed(0)
    first = smdm_loss(model, ids, mask_id=1, generator=gen)
    for _ in range(30):
        gen.manual_seed(0)
        loss = smdm_loss(model, ids, mask_id=1, generator=gen)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters()), "a parameter got no gradient"
        opt.step()
    assert loss.item() < 0.8 * first.item()


def test_evaluation_sums_the_objective_over_batches_and_draws():
    torch.manual_seed(6)
    # Three real tokens: a random model guesses some masked tokens right, so accuracy is not 0.
    model = DiffusionLM(variant_config("sink1", **{**SIZE, "vocab_size": 5}))
    batches = [torch.randint(2, 5, (2, 10)) for _ in range(2)]
    got = evaluate_masked_diffusion(model, batches, mask_id=1, seed=3, draws=2)
    gen = torch.Generator().manual_seed(3)
    nll = correct = masked_count = 0.0
    with torch.no_grad():
        for batch in batches:
            for _ in range(2):
                masked, t = draw_masks(batch, generator=gen)
                logits = model(torch.where(masked, 1, batch)).logits[masked]
                ce = F.cross_entropy(logits, batch[masked], reduction="none")
                nll += float((ce / t.expand_as(masked)[masked]).sum())
                correct += float((logits.argmax(-1) == batch[masked]).sum())
                masked_count += float(masked.sum())
    assert got["n_masked"] == masked_count > 0 and correct > 0
    assert got["loss"] == pytest.approx(nll / (2 * 2 * batches[0].numel()), rel=1e-6)
    assert got["accuracy"] == pytest.approx(correct / masked_count)


def test_evaluation_uses_identical_draws():
    a = DiffusionLM(variant_config("baseline", **SIZE))
    batches = [torch.randint(2, SIZE["vocab_size"], (2, 10)) for _ in range(3)]
    r1 = evaluate_masked_diffusion(a, batches, mask_id=1, seed=7)
    r2 = evaluate_masked_diffusion(a, batches, mask_id=1, seed=7)
    assert r1 == r2 and r1["n_masked"] > 0


@pytest.mark.parametrize("variant", ["sink2", "sink_logit"])
def test_save_load_roundtrip(tmp_path, variant):
    model = DiffusionLM(variant_config(variant, **SIZE))
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    again = load_model(path)
    assert again.config == model.config
    ids = torch.randint(2, SIZE["vocab_size"], (1, 6))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="sink must be one of"):
        variant_config("baseline", **SIZE).__class__(vocab_size=5, mask_id=1, sink="bogus")
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config("sink3", **SIZE)


@pytest.mark.parametrize(
    "name, override",
    [
        ("sink1", dict(num_sink_tokens=4)),
        ("sink1", dict(sink="none")),
        ("sink4", dict(num_sink_tokens=2)),
        ("sink1_zero_value", dict(sink_zero_value=False)),
        ("gate", dict(sink="logit")),
    ],
)
def test_variant_config_refuses_a_conflicting_keyword(name, override):
    """Issue 19: the variant used to win silently (sink1 with num_sink_tokens=4 had one)."""
    (key,) = override
    with pytest.raises(ValueError, match=rf"variant '{name}' sets {key}=.*got {key}="):
        variant_config(name, **SIZE, **override)


def test_variant_config_accepts_the_variants_own_values():
    cfg = variant_config("sink4", **SIZE, sink="tokens", num_sink_tokens=4)
    assert (cfg.sink, cfg.num_sink_tokens) == ("tokens", 4)


@pytest.mark.parametrize(
    "override, exc, pattern",
    [
        (dict(n_heads=0), ValueError, "n_heads must be >= 1, got 0"),
        (dict(n_kv_heads=0), ValueError, "n_kv_heads must be >= 1, got 0"),
        (dict(n_layers=-1), ValueError, "n_layers must be >= 1"),
        (dict(d_model=32.0), TypeError, "d_model must be an int, got float"),
        (dict(vocab_size=0), ValueError, "vocab_size must be >= 1"),
        (dict(mask_id=37), ValueError, r"mask_id must be a token id in \[0, vocab_size = 37\)"),
        (dict(mask_id=-1), ValueError, "mask_id must be >= 0"),
        (dict(mask_id=True), TypeError, "mask_id must be an int, got bool"),
        (dict(norm_eps=0.0), ValueError, "norm_eps must be finite and > 0"),
        (dict(rope_theta=float("nan")), ValueError, "rope_theta must be finite"),
        (dict(init_std="0.02"), TypeError, "init_std must be a float, got str"),
        (dict(ffn_hidden=0), ValueError, "ffn_hidden must be >= 1"),
        (dict(num_sink_tokens=2), ValueError, "num_sink_tokens=2 applies to sink='tokens' only"),
        (dict(sink_position="end"), ValueError, "sink_position='end' applies to sink='tokens'"),
        (dict(sink="tokens", sink_zero_value=1), TypeError, "sink_zero_value must be a bool"),
    ],
)
def test_config_checks_every_field(override, exc, pattern):
    """Issue 19: n_heads=0 gave a ZeroDivisionError, an out-of-vocabulary mask_id an index
    error at the first forward."""
    with pytest.raises(exc, match=pattern):
        DiffusionLMConfig(**{**SIZE, **override})
