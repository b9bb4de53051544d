"""`engine export`: the HF model (and LoRA adapter) from any checkpoint, for a run that stopped before its own export
(engine/artifacts.py `export_checkpoint`, the path the end of every run exports through)."""

from __future__ import annotations

from engine.artifacts import export_checkpoint

NAME = "export"
HELP = ("write the HF-format model (safetensors) and, for LoRA, the adapter from a checkpoint of any layout and "
        "precision (one process, or DeepSpeed ZeRO-0/1/2/3 shards of any number of ranks), without a launcher")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a checkpoint folder (RUN/checkpoints/step-N) or a run folder (its newest complete checkpoint)")
    p.add_argument("--out", "-o", default=None, metavar="DIR",
                   help="where to write model/ (and adapter/); default: the run folder, if it holds no export yet")
    p.add_argument("--no-merge", action="store_true", help="LoRA: write only the adapter, not the merged model")


def run(args) -> int:
    ckpt, written = export_checkpoint(args.checkpoint, args.out, merge_lora=False if args.no_merge else None)
    for kind, folder in written.items():
        print(f"exported {kind} from {ckpt}: {folder}")
    return 0
