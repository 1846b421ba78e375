"""sinkdlm.hf adapters for remote-code DLMs, against mirrors of LLaDA and Dream modeling files."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from conftest import count_sink_passes, realigned  # noqa: E402
from hf_mirrors.modeling_dream_mirror import DreamConfig, DreamModel  # noqa: E402
from hf_mirrors.modeling_llada_mirror import (  # noqa: E402
    ActivationCheckpointingStrategy,
    LLaDAConfig,
    LLaDAModelLM,
)

import sinkdlm  # noqa: E402
import sinkdlm.hf  # noqa: E402
from sinkdlm.hf.shims import remote_code_compat  # noqa: E402

MIRRORS = Path(__file__).parent / "hf_mirrors"
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
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


def llada(dtype=torch.float64, seed=0, **config):
    torch.manual_seed(seed)
    return LLaDAModelLM(LLaDAConfig(**config)).to(dtype).eval()


def llada_literal(model, sink_weight, ids, real=None):
    """Unpatched LLaDA with a real sink token in front (rotary position 0, tokens at 1..L) and the
    dense sink mask (with the key padding ``real``) put into its SDPA calls."""
    literal = copy.deepcopy(model)
    length = ids.shape[1]
    mask = sinkdlm.sink_attention_mask(length, 0, key_padding_mask=real)
    mask = mask if real is None else mask[:, None]

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


def test_llada_padding_reaches_sink_attention_through_attention_bias():
    # issue 13 (1): dLLM's LLaDA turns attention_mask into attention_bias; it was dropped
    model = llada()
    patched = sinkdlm.hf.add_sink_token(copy.deepcopy(model))
    sink = set_random_sink(patched)
    ids, real = ids_and_padding()
    with torch.no_grad():
        got = patched(input_ids=ids, attention_mask=real.long(), use_cache=False).logits
        want = llada_literal(model, sink, ids, real)
        unpadded = patched(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    assert (got[-1] - unpadded[-1]).abs().max() > 1e-3  # the padding mattered
    # a bias that is not key padding (here causal) is refused, not ignored
    causal = torch.full((1, 1, 9, 9), torch.finfo(torch.float).min).triu(1)
    with pytest.raises(ValueError, match="attention_bias"):
        patched(input_ids=ids, attention_bias=causal, use_cache=False)


CHECKPOINTING = [None, *ActivationCheckpointingStrategy, "gradient_checkpointing_enable"]


def llada_gradients(strategy):
    model = llada(torch.float32, n_layers=4).train()
    sinkdlm.hf.add_sink_token(model)
    set_random_sink(model)
    if strategy == "gradient_checkpointing_enable":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif strategy is not None:
        model.model.set_activation_checkpointing(strategy)
    ids, real = ids_and_padding()
    logits = model(input_ids=ids, attention_mask=real.long(), use_cache=False).logits
    logits.square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("strategy", CHECKPOINTING, ids=str)
def test_llada_every_activation_checkpointing_strategy_gives_the_same_gradients(strategy):
    # issue 13 (2): whole_layer / one_in_N called the model-level function set to None. The
    # sink pass runs uncheckpointed (a recompute would see the main pass's sink channel); the
    # checkpointed main pass recomputes the same bits.
    want = llada_gradients(None)
    got = llada_gradients(strategy)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert grad is not None and torch.equal(got[name], grad), (strategy, name)
    assert want["model.sink_embedding.weight"].abs().sum() > 0


def test_llada_whole_layer_with_transformers_default_reentrant_flag():
    # dLLM's LLaDA ignores transformers' (reentrant) gradient_checkpointing_func: not refused
    model = sinkdlm.hf.add_sink_token(llada(torch.float32).train())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids, _ = ids_and_padding()
    model(input_ids=ids, use_cache=False).logits.sum().backward()
    assert model.model.sink_embedding.weight.grad.abs().sum() > 0
    model.model._activation_checkpoint_fn.keywords["use_reentrant"] = True
    with pytest.raises(ValueError, match="non-reentrant"):
        model(input_ids=ids, use_cache=False)


def test_replacement_takes_the_original_keywords_and_refuses_what_it_does_not_implement():
    # issue 13 (3): Fast-dLLM's LLaDA passes replace_position= to the attention method
    model = llada()
    patched = sinkdlm.hf.add_sink_token(copy.deepcopy(model))
    ids, _ = ids_and_padding()
    with torch.no_grad():
        want = patched(input_ids=ids, use_cache=False).logits
        got = patched(input_ids=ids, use_cache=False, replace_position=None).logits
    assert torch.equal(got, want)
    with pytest.raises(NotImplementedError, match="replace_position"):
        patched(input_ids=ids, use_cache=False, replace_position=torch.ones(2, 9, dtype=torch.long))
    block = patched.model.transformer.blocks[0]
    q = torch.zeros(1, 1, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        block.attention(q, q[..., :16], q[..., :16], bogus=1)


def write_remote_code_checkpoint(model, path, family="llada"):
    """A checkpoint that loads through trust_remote_code, like the hub's LLaDA and Dream repos.
    Written by hand (config + safetensors): transformers 5 cannot save the unshimmed Dream."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    mirror = f"modeling_{family}_mirror"
    shutil.copy(MIRRORS / f"{mirror}.py", path)
    config = json.loads((path / "config.json").read_text())
    classes = dict(llada=("LLaDAConfig", "LLaDAModelLM"), dream=("DreamConfig", "DreamModel"))
    config_class, model_class = classes[family]
    config["auto_map"] = {
        "AutoConfig": f"{mirror}.{config_class}",
        "AutoModel": f"{mirror}.{model_class}",
    }
    (path / "config.json").write_text(json.dumps(config))


def test_llada_remote_code_loads_trains_saves_and_reloads(tmp_path):
    write_remote_code_checkpoint(llada(torch.float32), tmp_path / "base", family="llada")
    if TRANSFORMERS_5:  # the mirror reproduces why LLaDA's remote code breaks under 5 ...
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


def dream(attention="sdpa", dtype=torch.float64, seed=0, **config):
    torch.manual_seed(seed)
    with remote_code_compat():  # Dream's rotary looks up ROPE_INIT_FUNCTIONS["default"]
        model = DreamModel(DreamConfig(attn_implementation=attention, **config))
    return model.to(dtype).eval()


def dream_literal(model, sink, ids, real):
    size, length = ids.shape
    literal_mask = sinkdlm.sink_attention_mask(length, 0, key_padding_mask=real).clone()
    literal_mask[:, :, 0] = True  # padded query rows see the sink, so they stay finite
    embeds = model.get_input_embeddings()(ids)
    return model(
        inputs_embeds=torch.cat([sink.to(embeds.dtype).expand(size, 1, -1), embeds], 1),
        position_ids=torch.arange(length + 1).expand(size, -1),
        attention_mask=literal_mask.unsqueeze(1),
    ).logits[:, 1:]


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
    with torch.no_grad():
        want = dream_literal(model, sink, ids, real)
        got_4d = patched(input_ids=ids, attention_mask=dream_mask(real)).logits
        got_2d = patched(input_ids=ids, attention_mask=real.long()).logits
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got_4d[real], want[real], **tol)
    torch.testing.assert_close(got_2d[real], want[real], **tol)


def test_dream_sink_is_rotated_at_the_sink_position_when_the_model_ignores_position_ids():
    # issue 13 (4): Fast-dLLM's Dream numbers positions 0..L-1 whatever position_ids it gets
    model = dream(ignore_position_ids=True)
    patched = sinkdlm.hf.add_sink_token(copy.deepcopy(model))
    sink = set_random_sink(patched)
    ids, real = ids_and_padding()
    with torch.no_grad():
        want = dream_literal(model, sink, ids, real)  # positions 0..L: the same either way
        got = patched(input_ids=ids, attention_mask=dream_mask(real)).logits
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    # without a rotary module on the layers, the model's own rotates the sink row (each layer
    # runs it with the model's tables at the sink position); a model whose rotary module numbers
    # the positions itself would rotate it at 0, which is detected and refused
    for layer in patched.model.layers:
        del layer.self_attn.rotary_emb
    with torch.no_grad():
        got = patched(input_ids=ids, attention_mask=dream_mask(real)).logits
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    rotary = patched.model.rotary_emb

    class Numbering(torch.nn.Module):
        def forward(self, x, position_ids):
            return rotary(x, torch.arange(x.shape[1])[None])

    patched.model.rotary_emb = Numbering()
    with pytest.raises(ValueError, match="ignores position_ids"):
        patched(input_ids=ids, attention_mask=dream_mask(real))


def test_dream_remote_code_loads_saves_and_reloads_its_logits(tmp_path):
    # issue 13 (5): ROPE_INIT_FUNCTIONS["default"], list _tied_weights_keys, the old
    # GenerationConfig.validate and uninitialised non-persistent inv_freq after loading
    model = dream(dtype=torch.float32)
    write_remote_code_checkpoint(model, tmp_path / "base", family="dream")
    ids, real = ids_and_padding()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=dream_mask(real)).logits
    loaded = realigned(sinkdlm.hf.from_pretrained(tmp_path / "base", trust_remote_code=True))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(input_ids=ids, attention_mask=dream_mask(real)).logits,
            want,
            rtol=1e-6,
            atol=1e-6,
        )
    assert loaded._prepare_generation_config(max_new_tokens=4).max_new_tokens == 4
    sinkdlm.hf.add_sink_token(loaded)
    set_random_sink(loaded)
    with torch.no_grad():
        tuned = loaded(input_ids=ids, attention_mask=dream_mask(real)).logits
    loaded.save_pretrained(tmp_path / "tuned")
    reloaded = sinkdlm.hf.from_pretrained(tmp_path / "tuned", trust_remote_code=True)
    assert sinkdlm.hf.has_sink_token(reloaded)
    with torch.no_grad():
        got = realigned(reloaded).eval()(input_ids=ids, attention_mask=dream_mask(real)).logits
    torch.testing.assert_close(got, tuned, rtol=1e-6, atol=1e-6)


def test_non_persistent_buffers_are_rebuilt_from_the_constructor():
    from sinkdlm.hf.shims import restore_non_persistent_buffers

    model = dream(dtype=torch.float32)
    ids, real = ids_and_padding()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=dream_mask(real)).logits
        for layer in model.model.layers:
            layer.self_attn.rotary_emb.inv_freq.fill_(float("nan"))
        model.model.rotary_emb.inv_freq.uniform_()
    fixed = restore_non_persistent_buffers(model)
    assert len(fixed) == len(model.model.layers) + 1
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=dream_mask(real)).logits, want)
    assert restore_non_persistent_buffers(model) == []


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


# ---------------------------------------------------------------- check_model


@pytest.mark.parametrize("family", ["llada", "dream", "dream_fast_dllm", "llama"])
def test_check_model_finds_sinkdlm_exact_on_each_variant(family):
    from conftest import tiny_hf_model

    model = {
        "llada": lambda: llada(),
        "dream": lambda: dream(),
        "dream_fast_dllm": lambda: dream(ignore_position_ids=True),
        "llama": lambda: tiny_hf_model("llama", torch.float64),
    }[family]()
    before = copy.deepcopy(model.state_dict())
    report = sinkdlm.hf.check_model(model)
    assert report.sdpa_calls == 2 and report.max_abs_logit > 0.1
    assert report.max_abs_diff < 1e-6, report  # float64, but rotary tables are float32
    assert not sinkdlm.hf.has_sink_token(model)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_check_model_reports_a_wrong_sink_position(monkeypatch):
    from sinkdlm.hf import adapters

    # the sink rotated at position 0 (the Dream adapter before issue 13, on a model that ignores
    # position_ids, used the model's tables, made for position 0)
    def at_zero(module, value, position_embeddings, position):
        return module.rotary_emb(value, torch.zeros(1, 1, dtype=torch.long))

    monkeypatch.setattr(adapters, "_dream_sink_rotation", at_zero)
    report = sinkdlm.hf.check_model(dream(ignore_position_ids=True))
    assert report.max_abs_diff > 1e-4


def test_check_model_needs_sdpa():
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        sinkdlm.hf.check_model(dream("eager"))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5], ids=["plain", "cfg"])
@pytest.mark.parametrize("make", [llada, dream], ids=["llada", "dream"])
def test_generate_runs_one_sink_pass_per_call(monkeypatch, make, cfg_scale):
    """Issue 19: a generate that dropped its sink K/V cache (one sink pass per forward) passed
    every test; here each call must run exactly one, whatever the backend and the guidance."""
    model = sinkdlm.hf.add_sink_token(make(dtype=torch.float32))
    model.config.use_cache = False  # LLaDA's remote code reads it (from_pretrained sets it)
    calls = count_sink_passes(monkeypatch, model)
    ids, _ = ids_and_padding(length=4)
    for expected in (1, 2):  # the cache is dropped when the call ends: the next one passes again
        out = sinkdlm.generate(model, ids, gen_length=4, steps=4, mask_id=VOCAB - 1,
                               cfg_scale=cfg_scale)  # fmt: skip
        assert out.shape == (2, 8)
        assert len(calls) == expected
