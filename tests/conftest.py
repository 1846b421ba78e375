"""Shared by the tests: the device parameters and the tiny model configs.

Import what is needed with ``from conftest import ...`` (pytest puts tests/ on sys.path).
"""

import importlib.util
import socket
from pathlib import Path

import pytest
import torch

import sinkdlm

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str):
    """A script of the repository (``benchmarks/...`` or ``examples/...``, relative to its root)
    loaded as a fresh module, so a test can call its functions and ``main``."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rendezvous(directory) -> str:
    """An ``init_method`` for ``torch.distributed.init_process_group`` in spawned test ranks: a
    file in ``directory`` (the test's tmp_path), so that the ranks meet without a TCP port, which
    another process could take between a test choosing it and rank 0 binding it."""
    return (Path(directory) / "rendezvous").resolve().as_uri()


def free_port() -> int:
    """A TCP port nothing listens on now, for launchers that need one (accelerate): it can still
    be taken before the launcher binds it, which accelerate notices and answers with a port of
    its own choosing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cuda_native() -> bool:
    """A GPU is present and sinkdlm's CUDA kernels are linked (torch is a CUDA build)."""
    return torch.cuda.is_available() and sinkdlm._C.build_info()["cuda_linked"]


def devices(native_cuda: bool = True) -> list:
    """``["cpu", "cuda"]`` as pytest params: CUDA cases are always collected and skip with a reason
    without a GPU (or, when ``native_cuda``, without sinkdlm's CUDA kernels linked)."""
    if native_cuda:
        skip, reason = not cuda_native(), "needs a GPU and sinkdlm built against a CUDA torch"
    else:
        skip, reason = not torch.cuda.is_available(), "needs a GPU"
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(skip, reason=reason))]


# A tiny transformers decoder: 2 layers, hidden 32, 4 query heads sharing 2 KV heads (GQA).
TINY_HF_CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TINY_HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_hf_model(family="llama", dtype=torch.float32, seed=0, **overrides):
    """A random ``TINY_HF_CONFIG`` causal LM of a transformers-native family (SDPA attention,
    eval mode); ``overrides`` change the config."""
    import transformers

    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    settings = dict(TINY_HF_CONFIG, attn_implementation="sdpa")
    if family == "mistral":
        settings["sliding_window"] = None
    settings.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**settings))
    return model.to(dtype).eval()


def realigned(model):
    """Copies every parameter into a fresh allocation. Weights loaded from safetensors sit in
    memory-mapped buffers whose alignment differs from freshly allocated ones, and CPU BLAS picks
    alignment-dependent kernels (last-bit differences); realigned, the same weights give the
    same bits."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return model


class SinkPasses:
    """How many forwards ran the sink through the model: the sink rows run, over the layers."""

    def __init__(self, layers):
        self.layers = layers
        self.rows = 0

    def __len__(self):
        assert self.rows % self.layers == 0, f"{self.rows} sink rows over {self.layers} layers"
        return self.rows // self.layers

    def clear(self):
        self.rows = 0


def count_sink_passes(monkeypatch, model):
    """Counts the sink passes of a patched model (every decoder layer runs the sink's row once
    per pass); ``len()`` of the result is the number so far."""
    from sinkdlm.hf import patch

    passes = SinkPasses(len(patch._state(model).layers))
    real_call = patch.sink_layer_call

    def counted(channel, index, batch_in, embed_sink, run_layer):
        def counted_run(sink_in):  # the sink's row, folded into the batch or on its own
            passes.rows += 1
            return run_layer(sink_in)

        return real_call(channel, index, batch_in, embed_sink, counted_run)

    monkeypatch.setattr(patch, "sink_layer_call", counted)
    return passes
