"""task=classification end to end on CPU: a tiny labelled set the test writes is learned to high accuracy through
`engine train`; the export is a transformers classifier with the label names; `engine eval` and `engine classify`
agree with training; LoRA (head trained in full) + checkpointing + 8-bit AdamW; ZeRO-3 through DeepSpeed."""

import csv
import json
import random

import pytest
import torch

from conftest import WORDS, flat_overrides, run_main
from engine.backends.torch_backend import TorchLayout

CUES = {"negative": ["awful", "sad", "terrible", "boring"], "neutral": ["ordinary", "average", "normal", "usual"],
        "positive": ["great", "lovely", "happy", "wonderful"]}


def write_labelled(path, n: int, seed: int) -> list[tuple[str, str]]:
    """Random words, then `, it was <cue>`: the label is the cue's class (the last token decides)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(CUES))
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        rows.append((f"{words}, it was {rng.choice(CUES[label])}", label))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    return {"dir": d, "train": d / "train.csv", "validation": d / "valid.csv",
            "rows": (write_labelled(d / "train.csv", 320, 1), write_labelled(d / "valid.csv", 90, 2))}


def overrides(data, out, **extra) -> dict:
    from conftest import deep_update

    cfg = {
        "task": "classification",
        "model": {"name": "gpt2", "init": "random", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
                  "dropout": 0.0},
        "data": {"train_file": str(data["train"]), "validation_file": str(data["validation"]), "block_size": 32},
        "optim": {"lr": 1e-2}, "schedule": {"warmup_steps": 2},
        "memory": {"precision": "fp32"},  # pinned: the default (auto) depends on the CPU
        "train": {"micro_batch_size": 16, "max_steps": 20, "seed": 7, "preflight": False},
        "eval": {"every_n_steps": 10},
        "logging": {"output_dir": str(out), "progress": False, "log_every": 1000},
        "checkpoint": {"every_n_steps": 0},
    }
    return deep_update(cfg, extra)


def train(data, out, **extra) -> tuple[dict, str]:
    rc, stdout, err = run_main(["train", *flat_overrides(overrides(data, out, **extra))])
    assert rc == 0, err[-3000:]
    return json.loads((out / "summary.json").read_text()), stdout


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clsrun") / "run"
    summary, stdout = train(data, out)
    return {"out": out, "summary": summary, "stdout": stdout}


def test_the_tiny_labelled_set_is_learned(run):
    """20 steps of a 2-layer, 32-wide GPT-2 with a classification head: validation accuracy >= 0.95 and every
    class's F1 >= 0.9, reported during training (metrics.jsonl) and at the end."""
    s = run["summary"]
    print(f"\nclassification: val_accuracy {s['val_accuracy']:.4f} macro-F1 {s['val_macro_f1']:.4f} after {s['steps']} steps")
    assert s["val_accuracy"] >= 0.95 and s["val_examples"] == 90
    assert all(s[f"val_f1_{c}"] >= 0.9 for c in CUES), s
    recs = [json.loads(l) for l in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20] and all("val_f1_neutral" in r for r in evals)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    assert "final: val_loss" in run["stdout"] and "accuracy" in run["stdout"] and "sample (" not in run["stdout"]


def test_export_is_a_transformers_classifier_with_the_label_names(run, data):
    from transformers import AutoConfig, pipeline

    model_dir = run["out"] / "model"
    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == ["GPT2ForSequenceClassification"]
    assert config.id2label == {0: "negative", 1: "neutral", 2: "positive"} and config.label2id["positive"] == 2
    assert config.pad_token_id == 50256 and (model_dir / "model.safetensors").exists()
    texts = ["the cat sat on the mat, it was lovely", "a dog ran, it was terrible", "the park, it was usual"]
    pipe = pipeline("text-classification", model=str(model_dir))
    assert [p["label"] for p in pipe(texts)] == ["positive", "negative", "neutral"]


def test_engine_eval_and_classify_agree_with_training(run, data):
    """`engine eval` on the validation file gives the training's final eval (same model, same data: loss within
    1e-5, same accuracy); `engine classify` labels every validation text as eval counted."""
    rc, out, err = run_main(["eval", run["out"], "--file", data["validation"], "--output", "jsonl"])
    assert rc == 0, err
    r = json.loads(out)
    s = run["summary"]
    assert r["examples"] == 90 and r["accuracy"] == s["val_accuracy"] and r["loss"] == pytest.approx(s["val_loss"], abs=1e-5)
    assert all(r[f"f1_{c}"] == pytest.approx(s[f"val_f1_{c}"]) for c in CUES)

    rc, out, err = run_main(["classify", run["out"], "--file", data["validation"], "--output", "jsonl"])
    assert rc == 0, err
    preds = [json.loads(l) for l in out.splitlines()]
    gold = data["rows"][1]
    assert [p["text"] for p in preds] == [t for t, _ in gold]
    assert sum(p["label"] == g for p, (_, g) in zip(preds, gold)) / len(gold) == s["val_accuracy"]
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-5 and p["score"] == max(p["scores"].values()) for p in preds)

    rc, out, _ = run_main(["classify", run["out"], "-t", "the bird flew, it was wonderful", "-t", "night, it was sad"])
    assert rc == 0 and [l.split("\t")[0] for l in out.splitlines()] == ["positive", "negative"]
    rc, out, _ = run_main(["eval", run["out"], "--file", data["validation"]])
    assert rc == 0 and out.splitlines()[1].split()[-6:] == ["F1", "negative", "F1", "neutral", "F1", "positive"]


def test_a_classifier_is_not_a_language_model(run, lm_runs):
    rc, _, err = run_main(["generate", run["out"]])
    assert rc == 2 and "is a sequence classifier (use engine classify / engine eval)" in err
    rc, _, err = run_main(["classify", lm_runs["full"], "-t", "x"])
    assert rc == 2 and "is a language model (use engine generate / engine eval)" in err
    rc, _, err = run_main(["eval", run["out"], lm_runs["full"]])
    assert rc == 2 and "cannot compare a language model with a classifier" in err


def test_lora_trains_adapters_and_the_whole_head_with_checkpointing_and_8bit_adam(data, tmp_path):
    """LoRA + activation checkpointing + AdamW8bit: the trainable weights are the adapters and the classification
    head (peft's modules_to_save), it still learns the set, and the adapter folder - loaded on the same random base
    rebuilt from the run config - labels text exactly as the merged export."""
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    s, _ = train(data, out, memory={"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
                                            "activation_checkpointing": True},
                 optim={"name": "adamw_8bit", "lr": 1e-2}, train={"max_steps": 30})
    assert s["val_accuracy"] >= 0.9, s
    lora = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert s["params"]["trainable"] == lora + 3 * 32  # the score head: 3 labels x 32, no bias
    saved = load_file(str(sorted((out / "checkpoints").iterdir())[-1] / TorchLayout.TRAINABLE))
    assert any("score" in k for k in saved) and all("lora_" in k or "score" in k for k in saved)
    assert json.loads((out / "adapter" / "config.json").read_text())["id2label"]["2"] == "positive"
    texts = [t for t, _ in data["rows"][1][:24]]
    (data["dir"] / "texts.txt").write_text("\n".join(texts) + "\n")
    results = []
    for model in (out / "adapter", out / "model"):
        rc, o, err = run_main(["classify", model, "--file", data["dir"] / "texts.txt", "--output", "jsonl"])
        assert rc == 0, err
        results.append([json.loads(l) for l in o.splitlines()])
    assert [r["label"] for r in results[0]] == [r["label"] for r in results[1]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(*results)) < 1e-4


def test_zero3_classification_through_deepspeed(data, tmp_path):
    """DeepSpeed ZeRO-3 (one process) with activation checkpointing: it learns, and the gathered export scores the
    validation file exactly as the run's own final eval did."""
    out = tmp_path / "z3"
    s, stdout = train(data, out, memory={"zero_stage": 3, "activation_checkpointing": True},
                      train={"max_steps": 20, "preflight": False})
    assert "backend deepspeed" in stdout and s["val_accuracy"] >= 0.95, s
    rc, o, err = run_main(["eval", out / "model", "--file", data["validation"], "--output", "jsonl"])
    r = json.loads(o)
    assert rc == 0 and r["accuracy"] == s["val_accuracy"] and r["loss"] == pytest.approx(s["val_loss"], abs=1e-5)


def test_a_16bit_deepspeed_classifier_export_keeps_its_pad_token(data, tmp_path):
    """A 16-bit DeepSpeed run exports the fp32 masters rebuilt from its checkpoint: the rebuilt model must carry the
    run's special token ids, or the classifier cannot find each text's last token (pad_token_id) when used."""
    out = tmp_path / "bf16"
    train(data, out, memory={"zero_stage": 1, "precision": "bf16"}, train={"max_steps": 4})
    exported = json.loads((out / "model" / "config.json").read_text())
    assert exported["pad_token_id"] == exported["eos_token_id"] == 50256
    rc, o, err = run_main(["eval", out / "model", "--file", data["validation"], "--output", "jsonl"])
    assert rc == 0, err
    assert json.loads(o)["examples"] == 90


# ----------------------------------------------------------------------------- data, labels, metrics, config


def _splits(tmp_path, files: dict, **cfg):
    from engine.classification import load_classification_splits
    from engine.config import validate_dict
    from engine.tokenizer import load_tokenizer

    c = validate_dict({"task": "classification", "data": {"block_size": 16, **files}, **cfg})
    return load_classification_splits(c, load_tokenizer(c.model))


def test_labels_names_ids_and_truncation(tmp_path):
    """Derived names are sorted (numerically for integers); configured names accept the names or their integer ids
    (IMDB's 0/1); long texts keep their first block_size tokens."""
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps({"review": t, "sentiment": y}) for t, y in
                           [("good film " * 20, 1), ("bad film", 0), ("dull", 10), ("fine", 2)]) + "\n")
    v = tmp_path / "v.jsonl"
    v.write_text(json.dumps({"review": "ok", "sentiment": 1}) + "\n")
    files = {"train_file": str(f), "validation_file": str(v), "text_field": "review", "label_field": "sentiment"}
    splits, names = _splits(tmp_path, files)
    assert names == ["0", "1", "2", "10"]
    assert [y for _, y in splits["train"].examples] == [1, 0, 3, 2] and len(splits["train"].examples[0][0]) == 16
    eleven = ["neg", "pos", "mixed", *"abcdefgh"]
    splits, names = _splits(tmp_path, files, classification={"labels": eleven})
    assert names == eleven and [y for _, y in splits["train"].examples] == [1, 0, 10, 2]
    assert splits["validation"].examples[0][1] == 1
    f.write_text(json.dumps({"review": "nice", "sentiment": "pos"}) + "\n" + json.dumps({"review": "meh", "sentiment": 0}) + "\n")
    splits, names = _splits(tmp_path, files, classification={"labels": ["neg", "pos"]})
    assert [y for _, y in splits["train"].examples] == [1, 0]


def test_label_errors_are_one_line(tmp_path):
    from engine.errors import DataError

    t = tmp_path / "train.csv"
    t.write_text("text,label\nnice,pos\nbad,neg\n")
    v = tmp_path / "valid.csv"
    v.write_text("text,label\nso so,meh\n")
    with pytest.raises(DataError, match=r"valid.csv: label 'meh' is not one of the labels of the train file .* \(neg, pos\)"):
        _splits(tmp_path, {"train_file": str(t), "validation_file": str(v)})
    with pytest.raises(DataError, match=r"label 'meh' is not one of classification.labels \(neg, pos\)"):
        _splits(tmp_path, {"train_file": str(t), "validation_file": str(v)}, classification={"labels": ["neg", "pos"]})
    v.write_text("text,label\nnice,pos\n")
    t.write_text("text,label\nnice,pos\ngood,pos\n")
    with pytest.raises(DataError, match="every row has the label 'pos'; classification needs at least two labels"):
        _splits(tmp_path, {"train_file": str(t), "validation_file": str(v)})
    t.write_text("review,label\nnice,pos\n")
    with pytest.raises(DataError, match=r"no column 'text' in the header \(review, label\)"):
        _splits(tmp_path, {"train_file": str(t), "validation_file": str(v)})
    t.write_text("text,label\nnice, really,pos\n")
    with pytest.raises(DataError, match="line 2: more fields than the header has"):
        _splits(tmp_path, {"train_file": str(t), "validation_file": str(v)})


def test_metrics_from_a_confusion_matrix():
    """Rows gold, columns predicted. a: P 2/3 R 2/3; b: P 1/2 R 1/3; c: P 2/3 R 1; 'd' never occurs (left out of
    the macro average)."""
    from engine.metrics import metrics_from_confusion

    conf = torch.tensor([[2, 1, 0, 0], [1, 1, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]])
    m = metrics_from_confusion(conf, ["a", "b", "c", "d"], loss_sum=4.0, prefix="val")
    f1 = {"a": 2 / 3, "b": 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3), "c": 2 * (2 / 3) / (2 / 3 + 1), "d": 0.0}
    assert m["val_accuracy"] == pytest.approx(5 / 8) and m["val_loss"] == pytest.approx(0.5) and m["val_examples"] == 8
    assert all(m[f"val_f1_{k}"] == pytest.approx(v) for k, v in f1.items())
    assert m["val_macro_f1"] == pytest.approx((f1["a"] + f1["b"] + f1["c"]) / 3)


@pytest.mark.parametrize("overrides,message", [
    (["task=classification", "memory.loss_chunk_size=64"], "memory.loss_chunk_size chunks the LM head"),
    (["task=classification", "data.format=text"], "task=classification needs labelled rows"),
    (["data.format=csv"], "data.format=csv is for task=classification"),
    (["classification.labels=[a,b]"], "classification.labels is set but task=causal_lm"),
    (["task=classification", "classification.labels=[a]"], "at least two distinct names"),
])
def test_incompatible_classification_settings_are_rejected(overrides, message):
    rc, out, err = run_main(["train", "--dry-run", *overrides])
    assert rc == 2 and err.count("\n") == 1 and message in err, err
