"""The sink's row inside each decoder layer's call equals the former two-pass form (the sink alone
through the whole model collecting every layer's K/V, then the batch reading them): logits and
every gradient in float64, native families and the LLaDA / Dream adapters."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import TINY_HF_FAMILIES, load_script, tiny_hf_model  # noqa: E402
from hf_mirrors.modeling_dream_mirror import DreamConfig, DreamModel  # noqa: E402
from hf_mirrors.modeling_llada_mirror import LLaDAConfig, LLaDAModelLM  # noqa: E402

import sinkdlm.hf  # noqa: E402
from sinkdlm.hf import native, patch  # noqa: E402
from sinkdlm.hf.layer import SinkKV  # noqa: E402
from sinkdlm.hf.shims import remote_code_compat  # noqa: E402

VOCAB = 128
TOLERANCE = dict(rtol=0, atol=1e-12)


def native_sink_pass(state, sink):
    """The sink alone through the model at its position, collecting every layer's K/V."""
    collector = SinkKV(collect=True)
    state.original_forward(
        inputs_embeds=sink,
        position_ids=torch.full((1, 1), state.sink_position),
        use_cache=False,
        **{native.SINK_KWARG: collector},
    )
    return collector.kv


def adapter_sink_pass(run):
    def sink_pass(state, sink):
        state.channel = SinkKV(collect=True)
        run(state, sink)
        kv, state.channel = state.channel.kv, None
        return kv

    return sink_pass


@adapter_sink_pass
def llada_sink_pass(state, sink):
    state.original_forward(input_ids=None, input_embeddings=sink, use_cache=False)


@adapter_sink_pass
def dream_sink_pass(state, sink):
    position = torch.full((1, 1), state.sink_position)
    state.original_forward(inputs_embeds=sink, position_ids=position, use_cache=False)


def two_pass(model, sink_pass, **inputs):
    """The former form: the base model's forward runs the sink pass, then the batch with the
    collected K/V (given, so the layers run no sink row)."""
    state = patch._state(model)
    host = state.host
    patched_forward = host.__dict__["forward"]

    def forward(*args, **kwargs):
        sink = host.sink_embedding(torch.zeros(1, 1, dtype=torch.long))
        kv = sink_pass(state, sink)
        return state.backend.main(state, SinkKV(kv, given=True), args, kwargs)

    host.forward = forward
    try:
        return model(**inputs)
    finally:
        host.forward = patched_forward


def random_inputs(length=9, size=3):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[-1, length - 4 :] = 0
    return ids, mask


def patched(model):
    model = sinkdlm.hf.add_sink_token(model)
    sink = patch._state(model).host.sink_embedding.weight
    with torch.no_grad():
        sink.copy_(torch.randn(sink.shape, generator=torch.Generator().manual_seed(5)))
    return model.train()


def logits_and_grads(model, forward):
    model.zero_grad()
    logits = forward().logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9)).double()
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_same(model, in_layer, two_pass):
    got_logits, got_grads = logits_and_grads(model, in_layer)
    want_logits, want_grads = logits_and_grads(model, two_pass)
    torch.testing.assert_close(got_logits, want_logits, **TOLERANCE)
    assert got_grads.keys() == want_grads.keys()
    assert any("sink_embedding" in name for name in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **TOLERANCE, msg=name)


def force_row_path(monkeypatch):
    """The native layers run the sink's row as its own pass, as where a call cannot be folded
    (a KV cache, no rotary tables passed)."""
    monkeypatch.setattr(native.NativeBackend, "run_folded", lambda *args: None)


@pytest.mark.parametrize("path", ["folded", "row"])
@pytest.mark.parametrize("family", TINY_HF_FAMILIES)
def test_native_sink_row_in_each_layer_equals_the_two_pass_form(family, path, monkeypatch):
    """Folded (the sink's row appended to the batch in each layer call) and as its own pass."""
    if path == "row":
        force_row_path(monkeypatch)
    model = patched(tiny_hf_model(family, torch.float64, num_hidden_layers=3))
    ids, mask = random_inputs()
    assert_same(
        model,
        lambda: model(input_ids=ids, attention_mask=mask),
        lambda: two_pass(model, native_sink_pass, input_ids=ids, attention_mask=mask),
    )


@pytest.mark.parametrize("input_emb_norm", [False, True], ids=["plain", "input_emb_norm"])
def test_llada_sink_row_in_each_block_equals_the_two_pass_form(input_emb_norm):
    torch.manual_seed(0)
    config = LLaDAConfig(n_layers=3, input_emb_norm=input_emb_norm)
    model = patched(LLaDAModelLM(config).double())
    model.config.use_cache = False  # LLaDA's remote code reads it (from_pretrained sets it)
    ids, mask = random_inputs()
    assert_same(
        model,
        lambda: model(input_ids=ids, attention_mask=mask),
        lambda: two_pass(model, llada_sink_pass, input_ids=ids, attention_mask=mask),
    )


def test_dream_sink_row_in_each_layer_equals_the_two_pass_form():
    torch.manual_seed(0)
    with remote_code_compat():
        model = DreamModel(DreamConfig(num_hidden_layers=3))
    model = patched(model.double())
    ids, _ = random_inputs()
    assert_same(
        model,
        lambda: model(input_ids=ids),
        lambda: two_pass(model, dream_sink_pass, input_ids=ids),
    )


@pytest.mark.parametrize("path", ["folded", "row"])
def test_each_layer_call_runs_one_sink_row_and_deepcopy_rebinds_the_layers(path, monkeypatch):
    model = patched(tiny_hf_model("llama", torch.float64, num_hidden_layers=3))
    rows = []
    if path == "row":
        force_row_path(monkeypatch)
        real_row = patch._sink_row
        monkeypatch.setattr(patch, "_sink_row", lambda *a: rows.append(a[1]) or real_row(*a))
    else:
        real_fold = native.NativeBackend.run_folded

        def fold(self, state, layer, *args):
            out = real_fold(self, state, layer, *args)
            assert out is not None
            rows.append(layer)
            return out

        monkeypatch.setattr(native.NativeBackend, "run_folded", fold)
        monkeypatch.setattr(patch, "_sink_row", lambda *a: pytest.fail("a separate sink row ran"))
    ids, mask = random_inputs()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert rows == list(model.model.layers)
    copied = copy.deepcopy(model)
    rows.clear()
    copied(input_ids=ids, attention_mask=mask)
    assert rows == list(copied.model.layers)
    sinkdlm.hf.remove_sink_token(copied)
    assert all("forward" not in layer.__dict__ for layer in copied.model.layers)


def _reaches(start, goal):
    """``goal`` (an autograd node) is ``start`` or among the nodes its backward feeds."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node is goal:
            return True
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return False


@pytest.mark.parametrize("path", ["folded", "row"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_the_sink_rows_backward_runs_between_its_layers_output_and_input(
    monkeypatch, checkpointing, path
):
    """What FSDP relies on: a layer's parameters are gathered for backward when the gradient of
    its call's output arrives, and freed once its call's inputs have theirs. So, in the graph,
    the call's output must lead to the sink row's output (its backward waits for the output's
    gradient) and the sink row's input must lead to the call's input (the input's gradient
    waits for the sink row's backward)."""
    model = patched(tiny_hf_model("llama", torch.float64, num_hidden_layers=3))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if path == "row":
        force_row_path(monkeypatch)
    rows, calls = {}, {}
    real_call = patch.sink_layer_call

    def recorded_call_with_sink(channel, index, batch_in, embed_sink, run_layer):
        def recorded_run(sink_in):
            out, sink_out = run_layer(sink_in)
            rows.setdefault(model.model.layers[index], (sink_in, sink_out))
            return out, sink_out

        return real_call(channel, index, batch_in, embed_sink, recorded_run)

    monkeypatch.setattr(patch, "sink_layer_call", recorded_call_with_sink)

    def recorded_call(layer, args, out):
        calls.setdefault(layer, (args[0], out))

    for layer in model.model.layers:
        layer.register_forward_hook(recorded_call)
    ids, mask = random_inputs()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert set(rows) == set(calls) == set(model.model.layers)
    for layer in model.model.layers:
        sink_in, sink_out = rows[layer]
        batch_in, batch_out = calls[layer]
        assert _reaches(batch_out.grad_fn, sink_out.grad_fn)
        assert _reaches(sink_in.grad_fn, batch_in.grad_fn)


def saved_bytes(model, ids):
    """Bytes of the distinct non-parameter storages autograd saves in one training forward,
    counted as benchmarks/fsdp_collectives.py counts them."""
    saved = load_script("benchmarks/fsdp_collectives.py").SavedForBackward(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        model(input_ids=ids).logits.sum().backward()
    return saved.nbytes


def test_folded_layers_save_only_the_sinks_share_of_rows():
    """The training goal's memory side: folded, a layer keeps what the unpatched layer keeps for
    L + 1 rows instead of L, and nothing more (no copy of the attention output to append the
    sink's row: the op's output is o_proj's input, as SDPA's is)."""
    batch, length = 2, 128
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    base = tiny_hf_model("llama", num_hidden_layers=3).train()
    want = saved_bytes(base, ids)
    got = saved_bytes(patched(tiny_hf_model("llama", num_hidden_layers=3)), ids)
    assert want < got <= want * (length + 1) / length * 1.002, (got, want)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("float32", True),
        ("float64", True),
        ("bfloat16 avx512_bf16", True),
        ("bfloat16 amx_bf16", False),  # the composed CPU path (ops/cpu_paths.py)
        ("meta device", False),  # stands in for CUDA: not sinkdlm's CPU kernel
        ("kv cache", False),
        ("no rotary tables", False),
        ("observer", False),
    ],
)
def test_a_layer_call_folds_where_the_native_cpu_kernel_runs_it(case, expected, monkeypatch):
    from sinkdlm.ops import cpu_paths

    layer = tiny_hf_model("llama", num_hidden_layers=1).model.layers[0]
    dtype = getattr(torch, case.split()[0], torch.float32)
    features = {"avx512f", "avx512_bf16", *(["amx_bf16"] if "amx" in case else [])}
    monkeypatch.setattr(cpu_paths, "CPU_FEATURES", frozenset(features))
    device = "meta" if case == "meta device" else "cpu"
    hidden = torch.randn(2, 5, 32, dtype=dtype, device=device)
    kwargs = {"position_embeddings": (hidden[..., :8], hidden[..., :8])}
    if case == "kv cache":
        kwargs["past_key_values"] = object()
    if case == "no rotary tables":
        kwargs = {}
    if case == "observer":
        layer.self_attn.attention_observer = lambda call: None
    assert native.folds(layer, (hidden,), kwargs) is expected
