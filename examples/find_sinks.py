"""Find the attention sinks of a diffusion LM while it generates, and plot where they move.

    python3 examples/find_sinks.py                         # tiny random model with a sink, CPU
    python3 examples/find_sinks.py --model /ckpt/LLaDA-8B-Instruct --trust_remote_code \\
        --mask_id 126336 --prompt "Explain attention sinks." --device cuda --dtype bfloat16
    python3 examples/find_sinks.py --model ... --add_sink  # the same model with the sink token

Every layer and head is recorded at every diffusion step by sinkdlm.analysis.AttentionRecorder
(a model patched with the sink token through sinkdlm's attention; an unpatched LLaDA or Dream
through its SDPA calls). Prints the moving-sink statistics and writes the sink heat map and the
value-norm histogram (PNG) to --out.
"""

import argparse
import json
from pathlib import Path

import torch
import transformers

import sinkdlm
import sinkdlm.hf
from sinkdlm.analysis import (
    AttentionRecorder,
    moving_sink_stats,
    plot_sink_heatmap,
    plot_value_norms,
)

BYTE_VOCAB = 257  # the tiny default model reads UTF-8 bytes; id 256 is its mask token


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local model directory; default: a tiny random model")
    parser.add_argument("--trust_remote_code", action="store_true", help="for LLaDA, Dream")
    parser.add_argument("--add_sink", action="store_true", help="give the model the sink token")
    parser.add_argument("--mask_id", type=int, default=BYTE_VOCAB - 1)
    parser.add_argument("--prompt", default="Attention sinks move between diffusion steps.")
    parser.add_argument("--gen_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--method", default="ratio", choices=["ratio", "zscore"])
    parser.add_argument("--out", type=Path, default=Path("sinks"))
    return parser.parse_args(argv)


def load(args):
    """(model, prompt ids (1, P)) for --model, or a tiny random Llama-shaped DLM over bytes."""
    dtype = getattr(torch, args.dtype)
    if args.model is None:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=BYTE_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = sinkdlm.hf.add_sink_token(transformers.LlamaForCausalLM(config))
        ids = torch.tensor([list(args.prompt.encode())])
    else:
        model = sinkdlm.hf.from_pretrained(
            args.model, dtype=dtype, trust_remote_code=args.trust_remote_code
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            args.model, trust_remote_code=args.trust_remote_code
        )
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        if args.add_sink:
            sinkdlm.hf.add_sink_token(model)
    return model.to(args.device, dtype).eval(), ids.to(args.device)


def main(argv=None):
    args = parse_args(argv)
    model, ids = load(args)
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        sinkdlm.generate(
            model,
            ids,
            gen_length=args.gen_length,
            steps=args.steps,
            mask_id=args.mask_id,
            progress=True,
        )
    trace = recorder.trace()
    stats = moving_sink_stats(trace, method=args.method)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_sink_heatmap(trace, args.out / "sinks.png", mask_id=args.mask_id, method=args.method)
    plot_value_norms(trace, args.out / "value_norms.png", method=args.method)
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1))
    for key in ("sink_rate", "move_rate", "position_spread", "sink_token_share"):
        print(f"{key:20} {stats[key]:.3f}")
    print(f"{'value norm sinks':20} {stats['value_norm_sink']:.2f}")
    print(f"{'value norm others':20} {stats['value_norm_other']:.2f}")
    print(f"wrote {args.out}/sinks.png, value_norms.png and stats.json")
    return stats


if __name__ == "__main__":
    main()
