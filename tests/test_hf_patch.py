"""sinkdlm.hf on transformers-native families (tiny random models, CPU)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import (  # noqa: E402
    TINY_HF_CONFIG,
    TINY_HF_FAMILIES,
    count_sink_passes,
    devices,
    realigned,
    tiny_hf_model,
)

import sinkdlm  # noqa: E402
import sinkdlm.hf  # noqa: E402
from sinkdlm.hf import native  # noqa: E402

VOCAB = TINY_HF_CONFIG["vocab_size"]


def batch(length=9, size=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, length), generator=gen)
    attention = torch.ones(size, length, dtype=torch.long)
    attention[-1, length - 3 :] = 0  # right padding on the last row
    return ids, attention


def literal_logits(model, sink_weight, ids, attention):
    """The paper's form on the UNPATCHED model: a real sink token at rotary position 0, every real
    token shifted by one, the dense sink mask, plain SDPA; the sink row is dropped."""
    size, length = ids.shape
    embeds = model.get_input_embeddings()(ids)
    sink = sink_weight.to(embeds.dtype).expand(size, 1, -1)
    real = attention.bool()
    mask = sinkdlm.sink_attention_mask(length, 0, key_padding_mask=real)
    mask = mask.clone()
    mask[:, :, 0] = True  # padded query rows see the sink, so they stay finite
    positions = torch.arange(length + 1, device=ids.device).expand(size, -1)
    out = model(
        inputs_embeds=torch.cat([sink, embeds], dim=1),
        position_ids=positions,
        attention_mask=mask.unsqueeze(1),
    ).logits
    return out[:, 1:]


def patched_copy(model, **kwargs):
    patched = sinkdlm.hf.add_sink_token(copy.deepcopy(model), **kwargs)
    with torch.no_grad():  # a random sink, so the test does not depend on the init
        sink = patched.model.sink_embedding.weight
        sink.copy_(torch.randn(sink.shape, generator=torch.Generator().manual_seed(7)))
    return patched


@pytest.mark.parametrize("device", devices(native_cuda=False))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("family", TINY_HF_FAMILIES)
def test_matches_literal_sink_token(family, dtype, device):
    model = tiny_hf_model(family, dtype).to(device)
    patched = patched_copy(model)
    ids, attention = (t.to(device) for t in batch())
    with torch.no_grad():
        got = patched(input_ids=ids, attention_mask=attention).logits
        want = literal_logits(model, patched.model.sink_embedding.weight, ids, attention)
    assert got.shape == (*ids.shape, VOCAB)
    real = attention.bool()
    # transformers builds rotary tables in float32, and the two forms use different absolute
    # positions, so float64 agrees to float32 rounding of cos/sin, not to float64 eps.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got[real], want[real], **tol)
    # the sink changes the model: the comparison is not vacuous
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention).logits
    assert not torch.allclose(got[real].double(), plain[real].double(), atol=1e-2)


def test_sink_position_is_relative():
    """Sink at -1 with tokens at 0..L-1 is the same model as the sink at 0 with tokens at 1..L."""
    model = tiny_hf_model("llama", torch.float64)
    at_minus_one = patched_copy(model)
    at_zero = patched_copy(model, sink_position=0)
    ids, attention = batch()
    with torch.no_grad():
        plain = at_minus_one(input_ids=ids, attention_mask=attention).logits
        shifted = at_zero(
            input_ids=ids,
            attention_mask=attention,
            position_ids=torch.arange(1, ids.shape[1] + 1).expand_as(ids),
        ).logits
        unshifted = at_zero(input_ids=ids, attention_mask=attention).logits
    torch.testing.assert_close(shifted, plain, rtol=1e-5, atol=1e-6)  # float32 rotary tables
    assert not torch.allclose(unshifted, plain, atol=1e-4)


def test_gradients_reach_the_sink_and_train_only_sink_freezes_the_rest():
    model = sinkdlm.hf.add_sink_token(tiny_hf_model("qwen2"))
    ids, attention = batch()
    model(input_ids=ids, attention_mask=attention).logits.square().mean().backward()
    assert model.model.sink_embedding.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None

    frozen = sinkdlm.hf.add_sink_token(tiny_hf_model("qwen2"), train_only_sink=True)
    frozen.train()
    frozen(input_ids=ids, attention_mask=attention).logits.square().mean().backward()
    sink = frozen.model.sink_embedding.weight
    assert sink.grad.abs().sum() > 0
    others = [name for name, p in frozen.named_parameters() if p is not sink and p.grad is not None]
    assert others == []
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == [
        "model.sink_embedding.weight"
    ]


def test_gradient_checkpointing_keeps_gradients():
    model = sinkdlm.hf.add_sink_token(tiny_hf_model("llama", torch.float64))
    ids, attention = batch()
    model(input_ids=ids, attention_mask=attention).logits.sum().backward()
    want = model.model.sink_embedding.weight.grad.clone()
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable()  # non-reentrant by default
    else:  # transformers 4.x defaults to reentrant checkpoints
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model(input_ids=ids, attention_mask=attention).logits.sum().backward()
    torch.testing.assert_close(model.model.sink_embedding.weight.grad, want)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="non-reentrant"):
        model(input_ids=ids, attention_mask=attention)


def test_init_options():
    model = tiny_hf_model("llama")
    table = model.get_input_embeddings().weight
    mean = sinkdlm.hf.add_sink_token(copy.deepcopy(model)).model.sink_embedding.weight
    torch.testing.assert_close(mean, table.mean(0))
    zeros = sinkdlm.hf.add_sink_token(copy.deepcopy(model), init="zeros")
    assert not zeros.model.sink_embedding.weight.any()
    token = sinkdlm.hf.add_sink_token(copy.deepcopy(model), init=5)
    assert torch.equal(token.model.sink_embedding.weight, table[5])
    with pytest.raises(ValueError, match="init"):
        sinkdlm.hf.add_sink_token(copy.deepcopy(model), init="ones")


def test_remove_restores_bit_for_bit_and_double_patch_is_a_no_op():
    model = tiny_hf_model("mistral")
    ids, attention = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attention).logits
    names = [n for n, _ in model.named_parameters()]
    sinkdlm.hf.add_sink_token(model)
    assert sinkdlm.hf.has_sink_token(model)
    assert model.config.sinkdlm["sink_position"] == -1
    sink = model.model.sink_embedding.weight
    assert sinkdlm.hf.add_sink_token(model, init="zeros") is model
    assert model.model.sink_embedding.weight is sink
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids, attention_mask=attention).logits, before)
    sinkdlm.hf.remove_sink_token(model)
    assert not sinkdlm.hf.has_sink_token(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "sinkdlm")
    assert "forward" not in model.model.__dict__
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=attention).logits, before)


def test_save_and_reload_give_identical_logits(tmp_path):
    model = patched_copy(tiny_hf_model("qwen3"))
    ids, attention = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attention).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    loaded = realigned(sinkdlm.hf.from_pretrained(tmp_path).eval())
    assert sinkdlm.hf.has_sink_token(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=attention).logits, want)

    # a plain transformers load followed by add_sink_token picks the saved embedding up
    plain = realigned(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    sinkdlm.hf.add_sink_token(plain, init="zeros")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=attention).logits, want)


def test_sink_kv_cache_computes_once_and_follows_weight_changes(monkeypatch):
    model = sinkdlm.hf.add_sink_token(tiny_hf_model("llama"))
    calls = count_sink_passes(monkeypatch, model)
    ids, attention = batch()
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=attention).logits
        model(input_ids=ids, attention_mask=attention)
    assert len(calls) == 2  # no caching outside the context
    calls.clear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with sinkdlm.hf.sink_kv_cache(model):
        with torch.no_grad():
            for _ in range(5):
                cached = model(input_ids=ids, attention_mask=attention).logits
        assert len(calls) == 1
        assert torch.equal(cached, first)
        # a training step inside the context recomputes (gradients) and changes the weights
        model(input_ids=ids, attention_mask=attention).logits.sum().backward()
        optimizer.step()
        assert len(calls) == 2
        with torch.no_grad():
            after = model(input_ids=ids, attention_mask=attention).logits
            model(input_ids=ids, attention_mask=attention)
        assert len(calls) == 3
    assert not torch.equal(after, first)


def test_generate_runs_the_sink_pass_once(monkeypatch):
    """sinkdlm.generate enters the sink K/V cache (through sinkdlm.protocol.inference_cache)."""
    model = sinkdlm.hf.add_sink_token(tiny_hf_model("llama"))
    calls = count_sink_passes(monkeypatch, model)
    ids, _ = batch(length=5)
    out = sinkdlm.generate(model, ids, gen_length=6, steps=3, mask_id=VOCAB - 1)
    assert out.shape == (2, 11)
    assert len(calls) == 1


def test_torch_compile_runs_fullgraph_with_gradients():
    model = patched_copy(tiny_hf_model("llama"))
    ids, attention = batch()
    want = model(input_ids=ids, attention_mask=attention).logits
    want.sum().backward()
    want_grad = model.model.sink_embedding.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(input_ids=ids, attention_mask=attention).logits
    got.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.model.sink_embedding.weight.grad, want_grad)
    assert sinkdlm.hf.has_sink_token(compiled)


def test_peft_lora_keeps_the_sink_trainable():
    peft = pytest.importorskip("peft")
    ids, attention = batch()
    lora = dict(r=4, target_modules=["q_proj", "v_proj"])
    # sink first, then LoRA with the sink module saved alongside the adapter
    model = sinkdlm.hf.add_sink_token(tiny_hf_model("llama"))
    model = peft.get_peft_model(model, peft.LoraConfig(**lora, modules_to_save=["sink_embedding"]))
    model(input_ids=ids, attention_mask=attention).logits.sum().backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None and "sink" in n]
    assert trained and all(p.requires_grad for n, p in model.named_parameters() if n in trained)
    # LoRA first, then the sink
    model = peft.get_peft_model(tiny_hf_model("llama"), peft.LoraConfig(**lora))
    sinkdlm.hf.add_sink_token(model)
    assert sinkdlm.hf.has_sink_token(model)
    model(input_ids=ids, attention_mask=attention).logits.sum().backward()
    sink = model.get_base_model().model.sink_embedding.weight
    assert sink.requires_grad and sink.grad.abs().sum() > 0


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), torch.nn.Sequential()], ids=str)
def test_a_module_without_config_raises_with_the_supported_list(model):
    """Issue 19: add_sink_token(torch.nn.Linear(2, 2)) gave "'Linear' object has no attribute
    'config'" instead of the promised error listing what is supported."""
    with pytest.raises(ValueError, match=r"cannot add the sink token to .*Supported.*llama"):
        sinkdlm.hf.add_sink_token(model)
    assert not sinkdlm.hf.has_sink_token(model)


@pytest.mark.parametrize(
    "model, kwargs, exc, pattern",
    [
        ("not a model", {}, TypeError, r"add_sink_token: model must be a transformers model"),
        (None, dict(sink_position=1.5), TypeError, r"add_sink_token: sink_position must be an int"),
        (None, dict(sink_position=True), TypeError, r"sink_position must be an int, got bool"),
    ],
)
def test_add_sink_token_names_the_bad_argument(model, kwargs, exc, pattern):
    model = tiny_hf_model("llama") if model is None else model
    with pytest.raises(exc, match=pattern):
        sinkdlm.hf.add_sink_token(model, **kwargs)
    assert not sinkdlm.hf.has_sink_token(model)


def test_unknown_architecture_raises_with_the_supported_list():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="Supported.*llama.*LLaDALlamaBlock"):
        sinkdlm.hf.add_sink_token(model)
    assert not sinkdlm.hf.has_sink_token(model)
    assert not any("sink" in name for name, _ in model.named_parameters())
    assert not hasattr(model.config, "sinkdlm")
    with sinkdlm.hf.sink_kv_cache(model):  # a no-op on models without the sink
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_kv_cache_and_bare_implementation_raise():
    model = tiny_hf_model("llama")
    model.set_attn_implementation(native.ATTN_IMPLEMENTATION)
    ids, _ = batch()
    with pytest.raises(RuntimeError, match="add_sink_token"):
        model(input_ids=ids)


def test_four_d_padding_masks_equal_the_two_d_mask_and_causal_ones_raise():
    model = patched_copy(tiny_hf_model("llama"))
    ids, attention = batch()
    real = attention.bool()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attention).logits
        for mask in (real[:, None, None, :], real[:, None, :, None] & real[:, None, None, :]):
            got = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(got[real], want[real], rtol=0, atol=0)
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        with pytest.raises(ValueError, match="bidirectional attention with key padding"):
            model(input_ids=ids, attention_mask=causal.expand(ids.shape[0], 1, -1, -1))


def test_bf16_autocast_on_float32_weights():
    """Trainer's --bf16: float32 weights under autocast (rotary leaves q/k float32, v bfloat16)."""
    model = patched_copy(tiny_hf_model("qwen2"))
    ids, attention = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attention).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=ids, attention_mask=attention).logits
    got.float().sum().backward()
    real = attention.bool()
    torch.testing.assert_close(got[real].float(), want[real], rtol=5e-2, atol=5e-2)
    assert model.model.sink_embedding.weight.grad.abs().sum() > 0


def test_deepcopy_of_a_patched_model_is_independent():
    """EMA and similar copies: the copy runs its own weights and its own sink."""
    model = patched_copy(tiny_hf_model("llama"))
    ids, attention = batch()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attention).logits
        assert torch.equal(twin(input_ids=ids, attention_mask=attention).logits, want)
        twin.model.sink_embedding.weight.zero_()
        assert not torch.equal(twin(input_ids=ids, attention_mask=attention).logits, want)
        assert torch.equal(model(input_ids=ids, attention_mask=attention).logits, want)
    sinkdlm.hf.remove_sink_token(twin)
    assert sinkdlm.hf.has_sink_token(model) and not sinkdlm.hf.has_sink_token(twin)


def test_attention_recorder_hooks_a_patched_model():
    from sinkdlm.analysis import AttentionRecorder, moving_sink_stats

    model = patched_copy(tiny_hf_model("llama"))
    ids, attention = batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention).logits
        with AttentionRecorder(model) as recorder:
            recorded = model(input_ids=ids, attention_mask=attention).logits
            model(input_ids=ids, attention_mask=attention)
    # Recording changes nothing but the rounding: a recorded layer runs the sink's row on its own
    # instead of folded into the batch (hf/native.py's folds), the same math.
    torch.testing.assert_close(recorded, plain)
    trace = recorder.trace()
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    assert trace.mass.shape == (2, layers, *ids.shape[:1], heads, ids.shape[1])
    assert trace.sink_mass.shape == (2, layers, ids.shape[0], heads, 1)
    # Each real query row's softmax over [sink ; keys] sums to one: the observer saw the q, k,
    # lse and sink K that the attention used (rotated the same way).
    total = trace.mass.sum(-1) + trace.sink_mass.sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)
    assert (trace.mass[..., -1, :, -3:] == 0).all()  # padded keys of the last row get nothing
    assert (trace.sink_mass > 0).all()
    assert trace.sink_value_norm.shape == (2, layers, heads, 1)
    stats = moving_sink_stats(trace)
    assert 0 < stats["sink_token_share"] < 1
    # Unpatched, the recorder watches SDPA calls: a causal Llama is refused, not mis-recorded.
    unpatched = tiny_hf_model("llama")
    with torch.no_grad(), AttentionRecorder(unpatched), pytest.raises(ValueError, match="bidirect"):
        unpatched(input_ids=ids, attention_mask=attention)
