"""`engine plan`: which configurations fit a GPU and the host, and which is fastest (engine/plan.py)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from tqdm import tqdm

from engine.families import folder_config, named_size, size_names
from engine.errors import ConfigError
from engine.memory.gpus import GPU, GPUS
from engine.memory.simulate import COMPILED_BOUND, GPU_OVERHEAD
from engine.plan import (
    GIB,
    Request,
    model_shape,
    activation_choices,
    format_table,
    parse_size,
    plan,
    recommend,
    strategies,
    verify,
    write_config,
)

NAME = "plan"
HELP = ('will it fit? predict GPU memory, host RAM and step time of every configuration, recommend the '
        'fastest that fits and write it as a config')


def add_arguments(p) -> None:
    p.add_argument("--model", default="gpt2-xl", metavar="SIZE|FOLDER",
                   help=f"a named size ({', '.join(size_names())}) or a model folder with a config.json, "
                        "planned with its architecture (default gpt2-xl)")
    p.add_argument("--gpu", choices=list(GPUS), help="a known GPU: sets memory, bf16 support and peak FLOP/s")
    p.add_argument("--gpu-mem", metavar="SIZE", help="memory per GPU, e.g. 16GiB (overrides --gpu's)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="the GPU supports bf16 (default: from --gpu, else no)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) in the run (default 1)")
    p.add_argument("--host-mem", metavar="SIZE", help="host RAM available to the run, e.g. 12GiB (default: not checked)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step over all GPUs (default: the micro-batch)")
    p.add_argument("--lora", action="store_true", help="plan LoRA (r=16) instead of full fine-tuning")
    p.add_argument("--clip-in-backward", choices=("stale", "exact"), default="stale",
                   help="how the in-backward candidates clip (optim.clip_in_backward): stale (default) costs no time, "
                        "exact runs a measuring pass first (about twice the compute)")
    p.add_argument("--compile", action="store_true",
                   help="plan with compiled blocks (train.compile_blocks): their measured step-time factor applies, "
                        "ZeRO-3 candidates are left out; memory is the eager step's, which bounded the compiled step's "
                        "in every measured pair")
    p.add_argument("--fused-head-loss", action="store_true",
                   help="plan the candidates without the chunked loss with memory.fused_head_loss (the head's loss "
                        "and gradient in one pass: less memory at the head, simulated; its GPU speed is not measured)")
    p.add_argument("--write", metavar="FILE", help="where to write the recommended config (default plan-<model>.yaml)")
    p.add_argument("--workers", type=int, help="simulation processes (default: CPU cores, at most 4)")


def request_from_args(args) -> Request:
    if not args.gpu and not args.gpu_mem:
        raise ConfigError("say which GPU: --gpu NAME (" + ", ".join(GPUS) + ") or --gpu-mem SIZE, e.g. --gpu-mem 16GiB")
    gpu = GPUS[args.gpu] if args.gpu else GPU(f"GPU with {args.gpu_mem}", 0, bf16=False, peak_tflops=65)
    if args.gpu_mem:
        gpu = replace(gpu, name=gpu.name if args.gpu else f"{args.gpu_mem} GPU",
                      memory_mib=parse_size(args.gpu_mem) // 2**20)
    if args.bf16 is not None:
        gpu = replace(gpu, bf16=args.bf16)
    if args.gpus < 1:
        raise ConfigError("--gpus must be at least 1")
    found = named_size(args.model)
    if found is None and folder_config(args.model) is None:
        raise ConfigError(f"--model {args.model}: not a named size ({', '.join(size_names())}) nor a folder with a "
                          "config.json")
    model = found[1].name if found else args.model
    try:
        context = model_shape(model).context
    except ValueError as e:
        raise ConfigError(f"--model {args.model}: {e}") from None
    if args.seq_len < 2 or args.seq_len > context:
        raise ConfigError(f"--seq-len {args.seq_len}: {model} takes 2 to {context} tokens")
    if args.global_batch is not None and args.global_batch < args.gpus:
        raise ConfigError(f"--global-batch {args.global_batch} is smaller than --gpus {args.gpus}")
    return Request(model=model, gpu=gpu, gpus=args.gpus,
                   host_bytes=parse_size(args.host_mem) if args.host_mem else None, seq_len=args.seq_len,
                   global_batch=args.global_batch, lora=args.lora, clip_in_backward=args.clip_in_backward,
                   compile_blocks=args.compile, fused_head_loss=args.fused_head_loss)


def run(args) -> int:
    req = request_from_args(args)
    n = sum(len(activation_choices(s)) for s in strategies(req))
    print(f"Planning {req.model} {'LoRA' if req.lora else 'full fine-tune'} on {req.gpus} x {req.gpu.name} "
          f"({req.gpu.memory_mib:,} MiB, {'bf16' if req.gpu.bf16 else 'fp16'})"
          + (f", {req.host_bytes / GIB:.1f} GiB host RAM" if req.host_bytes else "")
          + f", sequence {req.seq_len}" + (f", global batch {req.global_batch}" if req.global_batch else "")
          + (", compiled blocks" if req.compile_blocks else "")
          + (", fused head loss" if req.fused_head_loss else "")
          + f": simulating {n} configurations")
    bar = tqdm(total=n, unit="config", leave=False)
    rows, _ = plan(req, progress=lambda *_: bar.update(1), workers=args.workers)
    bar.close()
    # Only a candidate whose own direct simulation fits is recommended (the next one while it does not).
    chosen = recommend(rows, lambda row: verify(req, row))
    print(format_table(rows, chosen))
    print(f"\nGPU GiB: simulated peak per GPU"
          + (f" x {COMPILED_BOUND} (compiled blocks' measured bound)" if req.compile_blocks else "")
          + f" + {GPU_OVERHEAD['context_bytes'] // 2**20} MiB + "
          f"{GPU_OVERHEAD['fragmentation']:.0%} margin. host GiB and time: modelled (see engine/plan.py). "
          "time: per token, relative to the fastest configuration without recompute or offload.")
    if chosen is None:
        smallest = min(rows, key=lambda row: row.gpu_bytes)
        if smallest.gpu_bytes > req.gpu.memory_mib * 2**20:  # why not: the arithmetic itself
            print(f"\nNothing fits: the smallest {'LoRA' if req.lora else 'full fine-tune'} configuration, "
                  f"{smallest.name} at micro-batch {smallest.micro}, needs {smallest.gpu_bytes / GIB:.2f} GiB per GPU "
                  f"(simulated, with the margin) against {req.gpu.memory_mib / 1024:.2f}.")
        print("\nNothing fits. Try --lora, more GPUs (--gpus), a shorter --seq-len"
              + (", more host RAM" if req.host_bytes else "") + (" or a smaller --global-batch." if req.global_batch else "."))
        return 1
    path = args.write or f"plan-{req.model}{'-lora' if req.lora else ''}.yaml"
    write_config(req, chosen, path)
    print(f"\nRecommended: {chosen.name}, micro-batch {chosen.micro} x {chosen.accum} accumulation: "
          f"{chosen.gpu_bytes / GIB:.2f} GiB per GPU (simulated), x{chosen.relative_time:.2f} step time.")
    if chosen.strategy.quality:
        print(f"Quality: {chosen.strategy.quality}.")
    print(f"Wrote {path}: engine train --config {path} data.train_file=YOUR.txt")
    return 0
