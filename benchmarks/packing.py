"""Training throughput with packed vs padded batches of mixed-length documents.

The demo's corpus (Debian's fortunes and Jargon File, sinkdlm.data, its byte-level BPE): the first
--docs training documents, each cut to --max_len tokens, in a fixed shuffled order, --batch_docs
documents per step. A tiny Llama-shaped DLM patched with the sink token (sinkdlm.hf) runs one
masked-diffusion training step (forward + backward of sinkdlm.train.masked_diffusion_loss) per
batch, laid out three ways over the same documents:

* ``pad_longest``: a (batch_docs, longest) batch, right-padded, with an attention mask;
* ``pad_fixed``: a (batch_docs, max_len) batch, as fixed-length padding gives it;
* ``packed``: one row of all the batch's documents, no padding, position_ids restarting at each
  document and cu_seq_lens_q/k (what transformers' DataCollatorWithFlattening makes): the sink
  attention keeps the documents apart (the CPU kernel skips the key tiles of other documents).

Tokens/s counts real (document) tokens only. Time: best of --repeats passes over the batches.

Usage: PYTHONPATH=python python3 benchmarks/packing.py [--docs 256] [--batch_docs 16]
Writes benchmarks/results/packing_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
import transformers

import sinkdlm
import sinkdlm.hf
from sinkdlm import data
from sinkdlm.ops.cpu_paths import cpu_model
from sinkdlm.train import masked_diffusion_loss

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = ("pad_longest", "pad_fixed", "packed")


def load_documents(count: int, max_len: int, seed: int):
    """Token id lists of the first ``count`` training documents (shuffled with ``seed``), each
    cut to ``max_len``; and the tokenizer's vocabulary size and mask id."""
    train_docs, _ = data.split_documents(data.load_documents())
    tokenizer = data.train_tokenizer(train_docs)
    docs = list(train_docs)
    random.Random(seed).shuffle(docs)
    ids = [enc.ids[:max_len] for enc in tokenizer.encode_batch(docs[:count])]
    ids = [d for d in ids if d]
    return ids, tokenizer.get_vocab_size(), tokenizer.token_to_id(data.MASK_TOKEN)


def make_batches(docs, batch_docs, layout, max_len, pad_id):
    """(input_ids, kwargs of the loss) per step."""
    batches = []
    for start in range(0, len(docs), batch_docs):
        group = docs[start : start + batch_docs]
        if layout == "packed":
            ids = torch.tensor([[t for d in group for t in d]])
            positions = torch.cat([torch.arange(len(d)) for d in group])[None]
            lengths = torch.tensor([len(d) for d in group])
            cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
            longest = int(lengths.max())
            extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
            extra.update(max_length_q=longest, max_length_k=longest)
            batches.append((ids, dict(position_ids=positions, model_kwargs=extra)))
            continue
        width = max_len if layout == "pad_fixed" else max(len(d) for d in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, d in enumerate(group):
            ids[row, : len(d)] = torch.tensor(d)
            mask[row, : len(d)] = 1
        batches.append((ids, dict(attention_mask=mask)))
    return batches


def tiny_model(vocab_size, args):
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config)
    return sinkdlm.hf.add_sink_token(model).train()


def run_pass(model, batches, mask_id, seed):
    gen = torch.Generator().manual_seed(seed)
    for ids, kwargs in batches:
        loss = masked_diffusion_loss(model, ids, mask_id=mask_id, generator=gen, **kwargs)
        loss.backward()
    model.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--batch_docs", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "packing_cpu.json"))
    args = parser.parse_args()

    docs, vocab_size, mask_id = load_documents(args.docs, args.max_len, args.seed)
    pad_id = 0  # <|pad|>
    real_tokens = sum(len(d) for d in docs)
    model = tiny_model(vocab_size, args)
    rows = {}
    for layout in LAYOUTS:
        batches = make_batches(docs, args.batch_docs, layout, args.max_len, pad_id)
        run_pass(model, batches[:1], mask_id, args.seed)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            run_pass(model, batches, mask_id, args.seed)
            best = min(best, time.perf_counter() - start)
        slots = sum(ids.numel() for ids, _ in batches)
        rows[layout] = {
            "seconds": best,
            "tokens_per_second": real_tokens / best,
            "token_slots": slots,
            "padding_fraction": 1 - real_tokens / slots,
            "steps": len(batches),
        }
    base = rows["pad_longest"]["tokens_per_second"]
    for row in rows.values():
        row["speedup_vs_pad_longest"] = row["tokens_per_second"] / base

    lengths = sorted(len(d) for d in docs)
    result = {
        "benchmark": "packing",
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],  # the machine may be shared
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "code_path": "sinkdlm.hf native attention -> sink_attention backend='auto' (CPU: native "
        "kernel; packed rows with segment_ids)",
        "model": dict(hidden=args.hidden, layers=args.layers, heads=args.heads, vocab=vocab_size),
        "documents": len(docs),
        "real_tokens": real_tokens,
        "doc_length": dict(
            min=lengths[0], median=lengths[len(lengths) // 2], max=lengths[-1], cut=args.max_len
        ),
        "batch_docs": args.batch_docs,
        "repeats": args.repeats,
        "layouts": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"{result['cpu']}, {result['threads']} threads, torch {torch.__version__}")
    print(
        f"{len(docs)} documents, {real_tokens} tokens (length min/median/max "
        f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}), {args.batch_docs} per step"
    )
    print("| layout | padding | tokens/s | vs pad_longest |\n|---|---|---|---|")
    for layout, row in rows.items():
        print(
            f"| {layout} | {row['padding_fraction']:.0%} | {row['tokens_per_second']:,.0f} | "
            f"{row['speedup_vs_pad_longest']:.2f}x |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
