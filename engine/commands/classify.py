"""`engine classify`: label texts with a trained classifier."""

from __future__ import annotations

import json

from engine.artifacts import load_trained
from engine.errors import EngineError
from engine.records import read_records

NAME = "classify"
HELP = 'label texts with a trained classifier (task: classification)'


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a run folder (logging.output_dir), an exported model folder, or a LoRA adapter folder")
    p.add_argument("--text", "-t", action="append", default=[], metavar="TEXT", help="a text to label; repeat for more")
    p.add_argument("--file", "-f", metavar="FILE",
                   help="texts to label: one per line (.txt), or a CSV/JSONL with a --text-field column")
    p.add_argument("--text-field", default="text", metavar="NAME", help="CSV column / JSONL field with the text (default: text)")
    p.add_argument("--output", "-o", choices=("text", "jsonl"), default="text",
                   help="text: label<TAB>probability<TAB>text per line; jsonl: one object per text with every label's "
                        "probability")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="texts per forward pass (default 16)")
    p.add_argument("--base", metavar="MODEL", help="base model of a LoRA adapter (default: the one recorded with it)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")


def run(args) -> int:
    texts = list(args.text)
    if args.file:
        texts += [t for t, _ in read_records(args.file, "auto", args.text_field, "label", require_label=False)]
    if not texts:
        raise EngineError("nothing to classify: give --text TEXT (repeatable) or --file FILE")
    if any(not t.strip() for t in texts):
        raise EngineError(f"text {next(i for i, t in enumerate(texts, 1) if not t.strip())} is empty")
    if args.batch_size < 1:
        raise EngineError("--batch-size must be at least 1")
    trained = load_trained(args.model, "classification", base=args.base, device=args.device)
    results = classify_texts(trained, texts, args.batch_size)
    for r in results:
        if args.output == "jsonl":
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"{r['label']}\t{r['score']:.4f}\t{r['text']}")
    return 0


def classify_texts(trained, texts: list[str], batch_size: int = 16) -> list[dict]:
    """Label texts with transformers' text-classification pipeline (softmax over the labels)."""
    from transformers import pipeline

    model, tok = trained.model, trained.tokenizer
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device=model.device)
    context = trained.context
    scored = pipe(texts, batch_size=batch_size, truncation=True, max_length=context, top_k=None)
    out = []
    for text, scores in zip(texts, scored):
        best = max(scores, key=lambda s: s["score"])
        out.append({"text": text, "label": best["label"], "score": best["score"],
                    "scores": {s["label"]: s["score"] for s in scores}})
    return out
