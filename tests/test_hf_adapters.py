"""sinkdlm.hf adapters for remote-code DLMs, against mirrors of LLaDA and Dream modeling files."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from conftest import realigned  # noqa: E402
from hf_mirrors.modeling_dream_mirror import DreamConfig, DreamModel  # noqa: E402
from hf_mirrors.modeling_llada_mirror import LLaDAConfig, LLaDAModelLM  # noqa: E402

import sinkdlm  # noqa: E402
import sinkdlm.hf  # noqa: E402

MIRRORS = Path(__file__).parent / "hf_mirrors"
VOCAB = 128


def ids_and_padding(length=9, size=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, length), generator=gen)
    real = torch.ones(size, length, dtype=torch.bool)
    real[-1, length - 3 :] = False
    return ids, real


def set_random_sink(model):
    sink = model.model.sink_embedding.weight
    with torch.no_grad():
        sink.copy_(torch.randn(sink.shape, generator=torch.Generator().manual_seed(7)))
    return sink


# ---------------------------------------------------------------- LLaDA


def llada(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return LLaDAModelLM(LLaDAConfig()).to(dtype).eval()


def llada_literal(model, sink_weight, ids):
    """Unpatched LLaDA with a real sink token in front (rotary position 0, tokens at 1..L) and the
    dense sink mask put into its SDPA call, which otherwise takes no mask."""
    literal = copy.deepcopy(model)
    length = ids.shape[1]
    mask = sinkdlm.sink_attention_mask(length, 0)

    def masked_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        groups = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask
        )

    for block in literal.model.transformer.blocks:
        block._scaled_dot_product_attention = masked_sdpa
    embeds = literal.get_input_embeddings()(ids)
    sink = sink_weight.to(embeds.dtype).expand(ids.shape[0], 1, -1)
    out = literal(inputs_embeds=torch.cat([sink, embeds], 1), use_cache=False).logits
    return out[:, 1:]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_llada_adapter_matches_literal_sink_token(dtype):
    model = llada(dtype)
    patched = sinkdlm.hf.add_sink_token(copy.deepcopy(model))
    sink = set_random_sink(patched)
    ids, _ = ids_and_padding()
    with torch.no_grad():
        got = patched(input_ids=ids, use_cache=False).logits
        want = llada_literal(model, sink, ids)
        plain = model(input_ids=ids, use_cache=False).logits
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    assert not torch.allclose(got.double(), plain.double(), atol=1e-2)


def test_llada_adapter_gradients_remove_and_idempotence():
    model = llada(torch.float32)
    ids, _ = ids_and_padding()
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    sinkdlm.hf.add_sink_token(model, train_only_sink=True)
    sink = model.model.sink_embedding.weight
    assert sinkdlm.hf.add_sink_token(model) is model and model.model.sink_embedding.weight is sink
    model(input_ids=ids, use_cache=False).logits.square().mean().backward()
    assert sink.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if p is not sink)
    sinkdlm.hf.remove_sink_token(model)
    assert all("attention" not in block.__dict__ for block in model.model.transformer.blocks)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)


def write_remote_code_checkpoint(model, path):
    """A checkpoint that loads through trust_remote_code, like the hub's LLaDA repos."""
    model.save_pretrained(path)
    shutil.copy(MIRRORS / "modeling_llada_mirror.py", path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_llada_mirror.LLaDAConfig",
        "AutoModel": "modeling_llada_mirror.LLaDAModelLM",
    }
    (path / "config.json").write_text(json.dumps(config))


def test_llada_remote_code_loads_trains_saves_and_reloads(tmp_path):
    write_remote_code_checkpoint(llada(torch.float32), tmp_path / "base")
    # the mirror reproduces why LLaDA's remote code breaks under transformers 5 ...
    with pytest.raises((AttributeError, TypeError)):
        transformers.AutoModel.from_pretrained(tmp_path / "base", trust_remote_code=True)
    # ... and sinkdlm's loader shims it
    model = sinkdlm.hf.from_pretrained(tmp_path / "base", trust_remote_code=True)
    assert not sinkdlm.hf.has_sink_token(model)
    sinkdlm.hf.add_sink_token(model)
    ids, _ = ids_and_padding()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = sinkdlm.train.masked_diffusion_loss(model, ids, mask_id=VOCAB - 1)
    loss.backward()
    optimizer.step()
    realigned(model).eval()  # it was itself loaded from safetensors
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "tuned")
    reloaded = sinkdlm.hf.from_pretrained(tmp_path / "tuned", trust_remote_code=True).eval()
    assert sinkdlm.hf.has_sink_token(reloaded)
    with torch.no_grad():
        assert torch.equal(realigned(reloaded)(input_ids=ids).logits, want)


# ---------------------------------------------------------------- Dream


def dream(attention="sdpa", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return DreamModel(DreamConfig(attn_implementation=attention)).to(dtype).eval()


def dream_mask(real):
    """Dream's own padding mask: (B, 1, L, L) bool, real query AND real key."""
    return real[:, None, :, None] & real[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_dream_adapter_matches_literal_sink_token(attention, dtype):
    model = dream(attention, dtype)
    patched = sinkdlm.hf.add_sink_token(copy.deepcopy(model))
    sink = set_random_sink(patched)
    ids, real = ids_and_padding()
    size, length = ids.shape
    literal_mask = sinkdlm.sink_attention_mask(length, 0, key_padding_mask=real).clone()
    literal_mask[:, :, 0] = True  # padded query rows see the sink, so they stay finite
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        want = model(
            inputs_embeds=torch.cat([sink.to(dtype).expand(size, 1, -1), embeds], 1),
            position_ids=torch.arange(length + 1).expand(size, -1),
            attention_mask=literal_mask.unsqueeze(1),
        ).logits[:, 1:]
        got_4d = patched(input_ids=ids, attention_mask=dream_mask(real)).logits
        got_2d = patched(input_ids=ids, attention_mask=real.long()).logits
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got_4d[real], want[real], **tol)
    torch.testing.assert_close(got_2d[real], want[real], **tol)


def test_dream_adapter_gradients_and_remove():
    model = dream("sdpa", torch.float32)
    ids, real = ids_and_padding()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=dream_mask(real)).logits
    sinkdlm.hf.add_sink_token(model)
    model(input_ids=ids, attention_mask=dream_mask(real)).logits.square().mean().backward()
    assert model.model.sink_embedding.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    sinkdlm.hf.remove_sink_token(model)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=dream_mask(real)).logits, before)


def test_adapter_kv_cache_is_rejected():
    model = sinkdlm.hf.add_sink_token(llada(torch.float32))
    ids, _ = ids_and_padding()
    past = [(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))] * 2
    with pytest.raises(NotImplementedError, match="KV caches"):
        model(input_ids=ids, past_key_values=past, use_cache=False)


def test_deepcopy_of_a_patched_dream_model_is_independent():
    model = sinkdlm.hf.add_sink_token(dream("sdpa", torch.float32))
    ids, real = ids_and_padding()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=dream_mask(real)).logits
        twin.model.layers[0].self_attn.v_proj.weight.mul_(2)
        assert not torch.equal(twin(input_ids=ids, attention_mask=dream_mask(real)).logits, want)
        assert torch.equal(model(input_ids=ids, attention_mask=dream_mask(real)).logits, want)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_attention_recorder_hooks_adapted_models(family):
    from sinkdlm.analysis import AttentionRecorder

    model = sinkdlm.hf.add_sink_token(llada() if family == "llada" else dream())
    set_random_sink(model)
    ids, real = ids_and_padding()
    # LLaDA's remote code predates transformers 5 (no use_cache default) and takes no padding here
    kwargs = dict(use_cache=False) if family == "llada" else dict(attention_mask=real.long())
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        model(input_ids=ids, **kwargs)
    trace = recorder.trace()
    assert trace.mass.shape[:2] == (1, len(sinkdlm.hf.attention_layers(model)))
    # softmax rows over [sink ; keys] sum to one: the observer saw what the attention used
    total = trace.mass.sum(-1) + trace.sink_mass.sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    assert (trace.sink_mass > 0).all()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_attention_recorder_watches_sdpa_of_unpatched_models(family):
    from sinkdlm.analysis import AttentionRecorder

    model = llada() if family == "llada" else dream()
    ids, real = ids_and_padding()
    kwargs = dict(use_cache=False) if family == "llada" else dict(attention_mask=dream_mask(real))
    with torch.no_grad():
        plain = model(input_ids=ids, **kwargs).logits
        with AttentionRecorder(model) as recorder:
            recorded = model(input_ids=ids, **kwargs).logits
            model(input_ids=ids, **kwargs)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0, equal_nan=True)  # untouched
    trace = recorder.trace()
    layers = len(
        [
            m
            for m in model.modules()
            if type(m).__name__ in ("LLaDALlamaBlock", "DreamSdpaAttention")
        ]
    )
    assert trace.mass.shape[:3] == (2, layers, ids.shape[0]) and trace.sink_mass.shape[-1] == 0
    # no sink: each real query row's softmax over the keys sums to one
    total = trace.mass.sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    if family == "dream":  # Dream's padding mask became a key-padding mask
        assert (trace.mass[:, :, -1, :, -3:] == 0).all() and (
            trace.mass[:, :, -1, :, :-3] > 0
        ).all()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5], ids=["plain", "cfg"])
@pytest.mark.parametrize("make", [llada, dream], ids=["llada", "dream"])
def test_generate_runs_one_sink_pass_per_call(monkeypatch, make, cfg_scale):
    """Issue 19: a generate that dropped its sink K/V cache (one sink pass per forward) passed
    every test; here each call must run exactly one, whatever the backend and the guidance."""
    from sinkdlm.hf import patch

    model = sinkdlm.hf.add_sink_token(make(dtype=torch.float32))
    model.config.use_cache = False  # LLaDA's remote code reads it (from_pretrained sets it)
    calls = []
    real_pass = patch._compute_sink_kv
    monkeypatch.setattr(patch, "_compute_sink_kv", lambda s: calls.append(1) or real_pass(s))
    ids, _ = ids_and_padding(length=4)
    for expected in (1, 2):  # the cache is dropped when the call ends: the next one passes again
        out = sinkdlm.generate(model, ids, gen_length=4, steps=4, mask_id=VOCAB - 1,
                               cfg_scale=cfg_scale)  # fmt: skip
        assert out.shape == (2, 8)
        assert len(calls) == expected
