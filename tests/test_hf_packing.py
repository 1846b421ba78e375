"""sinkdlm.hf on packed rows (transformers' padding-free collator): documents kept apart."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import TINY_HF_CONFIG, TINY_HF_FAMILIES, tiny_hf_model  # noqa: E402

import sinkdlm.hf  # noqa: E402
from sinkdlm.padding import segment_ids_from_packing  # noqa: E402

VOCAB = TINY_HF_CONFIG["vocab_size"]
LENGTHS = (5, 1, 9, 3)  # a one-token document among them


def patched(family, dtype=torch.float64):
    model = sinkdlm.hf.add_sink_token(copy.deepcopy(tiny_hf_model(family, dtype)))
    with torch.no_grad():  # a random sink, so the test does not depend on the init
        sink = model.model.sink_embedding.weight
        sink.copy_(torch.randn(sink.shape, generator=torch.Generator().manual_seed(7)))
    return model


def documents(seed=3, lengths=LENGTHS):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (n,), generator=gen).tolist()} for n in lengths]


def collate(docs, flash_kwargs):
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collator(docs)
    kwargs = {"position_ids": batch["position_ids"]}
    if flash_kwargs:
        kwargs.update({k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k")})
        kwargs.update({k: batch[k] for k in ("max_length_q", "max_length_k")})
    return batch["input_ids"], kwargs


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_documents_match_each_document_alone(family, flash_kwargs):
    model = patched(family)
    docs = documents()
    ids, kwargs = collate(docs, flash_kwargs)
    assert ids.shape == (1, sum(LENGTHS))
    with torch.no_grad():
        packed = model(input_ids=ids, **kwargs).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc["input_ids"]])).logits[0]
            n = alone.shape[0]
            torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-10, atol=1e-10)
            start += n
        # Without the packing signals the documents mix: the comparison above is not vacuous.
        mixed = model(input_ids=ids).logits[0]
    assert (mixed[: LENGTHS[0]] - packed[: LENGTHS[0]]).abs().max() > 1e-3


@pytest.mark.parametrize("family", TINY_HF_FAMILIES)
def test_packed_rows_in_a_batch_with_padding(family):
    """Two packed rows of different lengths, right-padded, position_ids restarting: each document
    equals itself alone."""
    model = patched(family)
    rows = [documents(1, (4, 6)), documents(2, (7,))]
    ids = torch.zeros(2, 10, dtype=torch.long)
    positions = torch.zeros(2, 10, dtype=torch.long)
    attention = torch.zeros(2, 10, dtype=torch.long)
    for r, row in enumerate(rows):
        tokens = [t for doc in row for t in doc["input_ids"]]
        ids[r, : len(tokens)] = torch.tensor(tokens)
        positions[r, : len(tokens)] = torch.cat([torch.arange(len(d["input_ids"])) for d in row])
        attention[r, : len(tokens)] = 1
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        for r, row in enumerate(rows):
            start = 0
            for doc in row:
                alone = model(input_ids=torch.tensor([doc["input_ids"]])).logits[0]
                n = alone.shape[0]
                torch.testing.assert_close(
                    packed[r, start : start + n], alone, rtol=1e-10, atol=1e-10
                )
                start += n


def test_training_gradients_of_a_packed_row_match_the_documents_alone():
    model = patched("llama")
    docs = documents(lengths=(6, 2, 5))
    ids, kwargs = collate(docs, flash_kwargs=False)
    sink = model.model.sink_embedding.weight
    packed_loss = model(input_ids=ids, **kwargs).logits.pow(2).sum()
    (packed_grad,) = torch.autograd.grad(packed_loss, sink)
    alone_loss = sum(
        model(input_ids=torch.tensor([d["input_ids"]])).logits.pow(2).sum() for d in docs
    )
    (alone_grad,) = torch.autograd.grad(alone_loss, sink)
    # The sink's gradient of an ordinary (unpacked) batch differs from its rows' alone by ~1e-8
    # too (the sink pass's float32 rotary tables); a mixed row would be off by ~1e-2.
    torch.testing.assert_close(packed_grad, alone_grad, rtol=1e-6, atol=1e-7)
    mixed_loss = model(input_ids=ids).logits.pow(2).sum()
    (mixed_grad,) = torch.autograd.grad(mixed_loss, sink)
    assert (mixed_grad - alone_grad).abs().max() > 1e-4


def test_unpacked_position_ids_change_nothing():
    model = patched("qwen2")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        offset = model(input_ids=ids, position_ids=torch.arange(7).expand(2, -1)).logits
    torch.testing.assert_close(offset, plain, rtol=0, atol=0)


def test_segment_ids_from_packing_decodes_and_refuses():
    who = "test"
    positions = torch.tensor([[0, 1, 2, 0, 0, 1]])
    want = torch.tensor([[0, 0, 0, 1, 2, 2]])
    torch.testing.assert_close(segment_ids_from_packing(positions, None, None, 1, 6, 6, who), want)
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    torch.testing.assert_close(segment_ids_from_packing(None, cu, cu, 1, 6, 6, who), want)
    assert segment_ids_from_packing(torch.arange(6)[None] + 4, None, None, 2, 6, 6, who) is None
    assert segment_ids_from_packing(None, None, None, 1, 6, 6, who) is None
    with pytest.raises(ValueError, match="only one of cu_seq_lens"):
        segment_ids_from_packing(None, cu, None, 1, 6, 6, who)
    with pytest.raises(ValueError, match="differ"):
        segment_ids_from_packing(None, cu, torch.tensor([0, 6], dtype=torch.int32), 1, 6, 6, who)
    with pytest.raises(ValueError, match="flattened to one row"):
        segment_ids_from_packing(None, cu, cu, 2, 6, 6, who)
    with pytest.raises(ValueError, match="end at the row's length"):
        segment_ids_from_packing(None, cu, cu, 1, 7, 7, who)
    with pytest.raises(ValueError, match="KV cache"):
        segment_ids_from_packing(positions, None, None, 1, 6, 9, who)
    with pytest.raises(ValueError, match="cannot tell"):
        segment_ids_from_packing(torch.zeros(3, 1, 6, dtype=torch.long), None, None, 1, 6, 6, who)


def test_attention_without_position_ids_is_refused():
    """A model path that passes no position_ids to the attention function: sinkdlm cannot tell
    whether the row is packed, so it raises instead of mixing documents."""
    from sinkdlm.hf import native
    from sinkdlm.hf.layer import SinkKV

    q = torch.randn(1, 4, 3, 8, dtype=torch.float64)
    kv = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    module = torch.nn.Module()
    module.layer_idx = 0
    sink = SinkKV({0: (torch.randn(2, 8, dtype=torch.float64),) * 2})
    with pytest.raises(RuntimeError, match="no position_ids"):
        native.sinkdlm_attention_forward(module, q, kv, kv, None, **{native.SINK_KWARG: sink})
    out, _ = native.sinkdlm_attention_forward(
        module, q, kv, kv, None, position_ids=None, **{native.SINK_KWARG: sink}
    )
    assert out.shape == (1, 3, 4, 8)
