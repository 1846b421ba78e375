"""Fine-tune a Hugging Face diffusion LM with the sink token, through transformers' Trainer.

The only sink-specific line is ``sinkdlm.hf.add_sink_token(model)``; the loss is the LLaDA / MDLM
masked diffusion objective (``sinkdlm.train.masked_diffusion_loss``). Multi-GPU / multi-node DDP
and FSDP come from the launcher, bf16 / checkpoints / progress from TrainingArguments:

    python3 examples/finetune.py --output_dir out/tiny     # tiny random model, CPU is enough
    torchrun --nproc_per_node 8 examples/finetune.py --model /ckpt/LLaDA-8B-Base \\
        --trust_remote_code --mask_id 126336 --train_files data/*.txt --bf16 --output_dir out/llada
    accelerate launch --config_file fsdp.yaml examples/finetune.py --model ... (FSDP)
    torchrun --nproc_per_node 8 examples/finetune.py --deepspeed examples/deepspeed_zero3.json ...
    python3 examples/finetune.py --packing --output_dir out/packed   # padding-free batches
    python3 examples/finetune.py --lora 16 --output_dir out/lora      # LoRA adapters + the sink

``--packing`` trains on documents (the text files cut at blank lines, each at most --seq_len
tokens) packed into one row per step with transformers' DataCollatorWithFlattening: no padding;
restarting position_ids and its cu_seq_lens_q/k keep the documents apart in the sink attention,
and each document draws its own noise level.

``--lora R`` trains rank-R LoRA adapters on every linear layer (PEFT's "all-linear": the LM head
left out) and the sink embedding in full (``modules_to_save``); the rest stays frozen.

The final save reloads with ``sinkdlm.hf.from_pretrained(output_dir)``; with ``--lora`` it holds
the adapters and the sink, loaded onto the base model (see ``load_lora``). Other Trainer-based DLM
trainers (for example dLLM) are patched the same way: call add_sink_token on the model before
handing it to their trainer.
"""

import argparse
import glob
import os

import torch
import transformers

import sinkdlm.hf
from sinkdlm.train import masked_diffusion_loss

BYTE_VOCAB = 257  # the tiny default model reads UTF-8 bytes; id 256 is its mask token


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", help="local model directory; default: a tiny random Llama-shaped DLM over bytes"
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="needed for remote-code models (LLaDA, Dream)",
    )
    parser.add_argument(
        "--train_files",
        nargs="+",
        default=[__file__],
        help="text files (globs allowed); default: this script's own source",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--mask_id", type=int, help="mask token id; default: the tokenizer's")
    parser.add_argument(
        "--seq_len", type=int, default=64, help="block length; with --packing, documents' maximum"
    )
    parser.add_argument(
        "--packing",
        action="store_true",
        help="padding-free batches: --batch_size documents packed into one row per device",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="per device")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--save_steps", type=int, default=500)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--sink_position", type=int, default=-1)
    parser.add_argument("--sink_init", default="mean", help="'mean', 'zeros' or a token id")
    parser.add_argument(
        "--train_only_sink", action="store_true", help="freeze everything but the sink embedding"
    )
    parser.add_argument(
        "--lora", type=int, default=0, metavar="R", help="train rank-R LoRA adapters (0: off)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use_cpu", action="store_true")
    parser.add_argument(
        "--deepspeed",
        metavar="CONFIG",
        help="DeepSpeed config (examples/deepspeed_zero3.json: ZeRO-3); launch with torchrun",
    )
    return parser.parse_args()


def tiny_byte_model(seed):
    """A random 2-layer bidirectional DLM over bytes (no download); built by from_config, which
    partitions it under a ZeRO-3 config as from_pretrained does."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def with_lora(model, rank):
    """``model`` (sink-patched) wrapped by PEFT: rank-``rank`` LoRA on every linear layer but the
    LM head, the sink embedding trained in full and saved with the adapters."""
    import peft

    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", modules_to_save=["sink_embedding"]
    )
    return peft.get_peft_model(model, config)


def load_lora(base, output_dir):
    """A --lora run's save loaded onto ``base`` (the model it started from, unpatched): the
    sink token added, then the adapters and the trained sink from ``output_dir``."""
    import peft

    return peft.PeftModel.from_pretrained(sinkdlm.hf.add_sink_token(base), output_dir)


def load_model_and_tokenizer(args):
    if args.model is None:
        return tiny_byte_model(args.seed), None
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        args.model, trust_remote_code=args.trust_remote_code
    )
    model = sinkdlm.hf.from_pretrained(
        args.model,
        trust_remote_code=args.trust_remote_code,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
    )
    return model, tokenizer


class TokenBlocks(torch.utils.data.Dataset):
    """The concatenated token stream of the text files, cut into (seq_len,) blocks."""

    def __init__(self, files, tokenizer, seq_len):
        text = "\n\n".join(open(f, encoding="utf-8").read() for f in files)
        if tokenizer is None:
            ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        else:
            ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        blocks = len(ids) // seq_len
        if blocks == 0:
            raise ValueError(f"{len(ids)} tokens are fewer than one block of --seq_len {seq_len}")
        self.blocks = ids[: blocks * seq_len].view(blocks, seq_len)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        return {"input_ids": self.blocks[index]}


class TextDocuments(torch.utils.data.Dataset):
    """The text files' documents (cut at blank lines), each tokenised and cut to seq_len: the
    mixed-length examples --packing packs."""

    def __init__(self, files, tokenizer, seq_len):
        text = "\n\n".join(open(f, encoding="utf-8").read() for f in files)
        pieces = [p.strip() for p in text.split("\n\n") if p.strip()]
        if tokenizer is None:
            docs = [list(p.encode("utf-8")) for p in pieces]
        else:
            docs = tokenizer(pieces)["input_ids"]
        self.docs = [d[:seq_len] for d in docs if d]
        if not self.docs:
            raise ValueError("the training files hold no text")

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, index):
        return {"input_ids": self.docs[index]}


# What DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds for the model.
PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class MaskedDiffusionTrainer(transformers.Trainer):
    """Trainer whose loss is the masked diffusion objective (labels are the inputs themselves)."""

    def __init__(self, *args, mask_id, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_id = mask_id

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = masked_diffusion_loss(
            model,
            inputs["input_ids"],
            mask_id=self.mask_id,
            attention_mask=inputs.get("attention_mask"),
            prompt_mask=inputs.get("prompt_mask"),
            position_ids=inputs.get("position_ids"),  # packed rows: restarting at each document
            model_kwargs={k: inputs[k] for k in PACKING_KWARGS if k in inputs},
        )
        return (loss, None) if return_outputs else loss


def training_arguments(args):
    # transformers >= 5.2x renamed gradient_checkpointing to activation_checkpointing
    fields = transformers.TrainingArguments.__dataclass_fields__
    checkpointing = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    return transformers.TrainingArguments(
        # non-reentrant: reentrant checkpoints cannot share the sink pass between layers
        **{
            checkpointing: args.gradient_checkpointing,
            f"{checkpointing}_kwargs": {"use_reentrant": False},
        },
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        remove_unused_columns=False,
        report_to="none",
        seed=args.seed,
        use_cpu=args.use_cpu,
        deepspeed=args.deepspeed,
        dataloader_drop_last=True,
    )


def main():
    args = parse_args()
    # Before the model: under a ZeRO-3 config this makes from_pretrained / from_config load each
    # rank's partition only (deepspeed.zero.Init), not a whole model per rank; add_sink_token
    # takes the partitioned model, and the Trainer's engine partitions the sink with the rest.
    training_args = training_arguments(args)
    model, tokenizer = load_model_and_tokenizer(args)
    mask_id = args.mask_id
    if mask_id is None:
        mask_id = BYTE_VOCAB - 1 if tokenizer is None else tokenizer.mask_token_id
    if mask_id is None:
        raise SystemExit("the tokenizer has no mask token; pass --mask_id")
    init = int(args.sink_init) if args.sink_init.isdigit() else args.sink_init
    sinkdlm.hf.add_sink_token(
        model, sink_position=args.sink_position, init=init, train_only_sink=args.train_only_sink
    )
    if args.lora:
        model = with_lora(model, args.lora)

    files = sorted({f for pattern in args.train_files for f in glob.glob(pattern)})
    if args.packing:
        dataset = TextDocuments(files, tokenizer, args.seq_len)
        collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    else:
        dataset, collator = TokenBlocks(files, tokenizer, args.seq_len), None
    trainer = MaskedDiffusionTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        mask_id=mask_id,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    if tokenizer is not None and trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
    if trainer.is_world_process_zero():
        reload = "load_lora(base_model, {!r})" if args.lora else "sinkdlm.hf.from_pretrained({!r})"
        where = os.path.abspath(args.output_dir)
        print(f"saved to {where}; reload with " + reload.format(args.output_dir))
    if torch.distributed.is_initialized():  # a clean gloo / NCCL shutdown under torchrun
        # Every rank's queued collectives finish before any rank leaves: with gloo, a rank whose
        # peer has gone can deadlock tearing down DDP's process group (its worker thread waits
        # for the GIL to free a finished all-gather's tensors while the main thread joins it).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
