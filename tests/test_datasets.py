"""`data.dataset`: training from a `save_to_disk` folder, from parquet files (a glob, through load_dataset's parquet
builder), a classifier on an IMDB-style parquet (text + 0/1 label), and the one-line errors a user will hit. All
data is written here by the test; nothing comes from the hub."""

import json
import random

import pytest

from conftest import WORDS, run_inprocess, run_main, write_corpus
from engine.checkpoint import TRAINER_STATE

NO_FILES = {"train_file": None, "validation_file": None}
NO_CORPUS = {"train": None, "validation": None}  # tiny_overrides wants file keys; data.dataset replaces them


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    d = tmp_path_factory.mktemp("dslines")
    return write_corpus(d / "all.txt", 440, 1).read_text().splitlines()


def write_parquet(path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path))


def test_training_from_a_save_to_disk_folder_equals_training_from_the_same_text(lines, tmp_path):
    """A DatasetDict saved with save_to_disk (train + validation splits) trains exactly as the same documents in text
    files do: the data path changes, the batches do not."""
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines[:400], "id": list(range(400))}),
                          "validation": datasets.Dataset.from_dict({"text": lines[400:], "id": list(range(40))})}
                         ).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "train.txt").write_text("\n".join(lines[:400]) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(lines[400:]) + "\n")
    files = {"train": tmp_path / "train.txt", "validation": tmp_path / "valid.txt"}
    ref, ref_losses = run_inprocess(files, tmp_path / "from_files")
    got, losses = run_inprocess(files, tmp_path / "from_dataset",
                                data={**NO_FILES, "dataset": str(tmp_path / "saved"), "validation_split": "validation"})
    assert losses == ref_losses and len(losses) == 6
    assert got["val_loss"] == ref["val_loss"]


def test_training_from_parquet_files_line_by_line_with_a_held_out_fraction(lines, tmp_path):
    """A glob of two parquet files (the dataset's `body` column), line_by_line, 10% held out for validation."""
    (tmp_path / "pq").mkdir()
    write_parquet(tmp_path / "pq" / "part-0.parquet", {"body": lines[:220], "n": list(range(220))})
    write_parquet(tmp_path / "pq" / "part-1.parquet", {"body": lines[220:], "n": list(range(220))})
    out = tmp_path / "run"
    summary, losses = run_inprocess(NO_CORPUS, out, data={**NO_FILES, "dataset": str(tmp_path / "pq" / "*.parquet"),
                                                   "text_field": "body", "mode": "line_by_line", "validation_split": 0.1,
                                                         "block_size": 64})
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert summary["val_loss"] < losses[0]
    plan = json.loads((out / "run.json").read_text())["plan"]
    assert plan["train_examples"] == 396  # 440 lines, the last 44 held out; one example per line


CUES = {0: ["awful", "sad", "terrible", "boring"], 1: ["great", "lovely", "happy", "wonderful"]}


def imdb_style(path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    labels = [rng.randint(0, 1) for _ in range(n)]
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + f", it was {rng.choice(CUES[y])}"
             for y in labels]
    write_parquet(path, {"text": texts, "label": labels})


def test_a_classifier_on_an_imdb_style_parquet_folder(tmp_path):
    """A folder of train.parquet / test.parquet (text + 0/1 int labels, as IMDB's), split by file name through
    load_dataset; label names from classification.labels; validation on the test split."""
    (tmp_path / "imdb").mkdir()
    imdb_style(tmp_path / "imdb" / "train.parquet", 320, 1)
    imdb_style(tmp_path / "imdb" / "test.parquet", 64, 2)
    out = tmp_path / "run"
    rc, _, err = run_main(["train", "task=classification", "model.init=random", "model.n_layer=2", "model.n_embd=32",
                           "model.n_head=2", "model.n_positions=64", "model.dropout=0", f"data.dataset={tmp_path / 'imdb'}",
                           "data.validation_split=test", "data.block_size=32", "classification.labels=[negative,positive]",
                           "optim.lr=1e-2", "schedule.warmup_steps=2", "memory.precision=fp32",
                           "train.micro_batch_size=16", "train.max_steps=20", "train.preflight=false",
                           "eval.every_n_steps=0", f"logging.output_dir={out}", "logging.progress=false",
                           "logging.plots=false", "logging.tensorboard=false"])
    assert rc == 0, err[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["val_examples"] == 64 and s["val_accuracy"] >= 0.9, s
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_a_class_label_column_gives_the_label_names(tmp_path):
    import datasets

    from engine.config import validate_dict
    from engine.classification import load_classification_splits
    from engine.tokenizer import load_tokenizer

    features = datasets.Features({"review": datasets.Value("string"),
                                  "sentiment": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"review": ["bad film", "good film", "", "fine film"], "sentiment": [0, 1, 1, 1]},
                               features=features).save_to_disk(str(tmp_path / "saved"))
    cfg = validate_dict({"task": "classification", "data": {"dataset": str(tmp_path / "saved"), "text_field": "review",
                                                            "label_field": "sentiment", "block_size": 16}})
    splits, names = load_classification_splits(cfg, load_tokenizer(cfg.model))
    assert names == ["neg", "pos"]
    assert [c for _, c in splits["train"].examples] == [0, 1, 1]  # the empty review is dropped


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Datasets a user might point at by mistake."""
    import datasets

    d = tmp_path_factory.mktemp("hostile")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b c", "d e f"], "score": [0.5, 0.7]}),
                          "test": datasets.Dataset.from_dict({"text": ["", "  "], "score": [0.1, 0.2]})}
                         ).save_to_disk(str(d / "saved"))
    return d


@pytest.mark.parametrize("args,needle", [
    (["data.split=validation"], "data.split=validation: data.dataset=.* has no such split \\(splits: train, test\\)$"),
    (["data.text_field=review"], "has no column 'review' \\(columns: text, score\\): set data.text_field$"),
    (["data.validation_split=test"], "split 'test' has no non-empty text in column 'text' \\(2 rows\\)$"),
    (["task=classification", "data.label_field=score"],
     "label column 'score' holds float64 values, which a classifier cannot use as classes"),
    (["data.text_field=score"], "column 'score' holds float64 values, not text: set data.text_field"),
])
def test_dataset_problems_are_one_line_errors(hostile, args, needle):
    rc, out, err = run_main(["train", "--dry-run", f"data.dataset={hostile / 'saved'}", "train.preflight=false", *args])
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    import re

    assert re.search(needle, err.strip()), err


@pytest.mark.parametrize("source,needle", [
    ("imdb", "not a local folder, file or glob, and the hub could not give it .*save_to_disk\\('imdb'\\).* pass "
             "data.dataset=imdb \\(the folder\\)"),
    ("./nowhere/data", "data.dataset=./nowhere/data: no such file or folder"),
    ("nowhere/*.parquet", "no files match it"),
])
def test_unreachable_sources_are_one_line_errors(source, needle, tmp_path):
    import re

    rc, _, err = run_main(["train", "--dry-run", f"data.dataset={source}", f"data.cache_dir={tmp_path}"])
    assert rc == 2 and err.count("\n") == 1, err
    assert re.search(needle, err), err


@pytest.mark.parametrize("args,needle", [
    (["data.dataset=x", "data.train_file=a.txt"], "data.dataset and data.train_file are two sources"),
    (["data.validation_split=validation"], "names a split of data.dataset, which is unset"),
    (["data.validation_split=0.7"], "must be a fraction from 0 up to 0.5"),
    (["data.dataset=x", "data.format=jsonl"], "data.format is for data.train_file"),
])
def test_inconsistent_dataset_keys_are_rejected_by_the_config(args, needle):
    rc, _, err = run_main(["train", "--dry-run", *args])
    assert rc == 2 and needle in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- streaming


def test_a_stream_packs_the_documents_in_order(lines, tmp_path):
    """The streamed examples are the documents of the parquet shards, in order, packed as the in-memory path packs
    them; the stream's end starts the next epoch from the top (the partial tail dropped)."""
    from engine.config import DataConfig, ModelConfig
    from engine.data import pack
    from engine.streaming import ExampleStream, open_stream_split
    from engine.tokenizer import load_tokenizer

    write_parquet(tmp_path / "a.parquet", {"text": lines[:30]})
    write_parquet(tmp_path / "b.parquet", {"text": lines[30:60]})
    tok = load_tokenizer(ModelConfig())
    cfg = DataConfig(dataset=str(tmp_path / "*.parquet"), streaming=True, block_size=32, cache_dir=str(tmp_path / "c"))
    blocks = pack([ids + [tok.eos_token_id] for ids in tok(lines[:60])["input_ids"]], 32).tolist()
    stream = ExampleStream(open_stream_split(cfg, "train", "data.split"), tok, cfg, "train")
    assert stream.take(len(blocks)) == blocks and stream.epoch == 0
    assert stream.take(3) == blocks[:3] and stream.epoch == 1


def test_a_streamed_run_resumes_exactly(lines, corpus, tmp_path):
    """8 steps over a stream of two parquet shards that ends after ~5 steps (so the resumed half crosses into the
    next epoch); cut at step 4 and resumed, it logs the same losses, lr and epochs, bit for bit, as the run that never
    stopped; the checkpoint holds the stream's position."""
    from conftest import assert_resumes_exactly

    (tmp_path / "pq").mkdir()
    write_parquet(tmp_path / "pq" / "a.parquet", {"text": lines[:20]})
    write_parquet(tmp_path / "pq" / "b.parquet", {"text": lines[20:40]})
    data = {**NO_FILES, "dataset": str(tmp_path / "pq" / "*.parquet"), "streaming": True}
    assert_resumes_exactly(NO_CORPUS, tmp_path, data=data)
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-0000004" / TRAINER_STATE).read_text())
    assert state["data"]["next_step"] == 4 and state["data"]["stream"]  # the IterableDataset's own state_dict()
    epochs = [json.loads(l)["epoch"] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    assert epochs[0] == 0 and epochs[-1] >= 1, epochs


@pytest.mark.parametrize("args,needle", [
    (["data.streaming=true"], "data.streaming reads data.dataset as a stream: set data.dataset"),
    (["data.streaming=true", "data.dataset=x", "train.max_steps=null"], "set train.max_steps"),
    (["data.streaming=true", "data.dataset=x", "data.validation_split=0.1"], "name a validation split"),
    (["data.streaming=true", "data.dataset=x", "task=classification"], "data.streaming is for task=causal_lm"),
])
def test_streaming_settings_are_checked(args, needle):
    rc, _, err = run_main(["train", "--dry-run", *args])
    assert rc == 2 and needle in err and err.count("\n") == 1, err


def test_unreadable_local_datasets_are_one_line_errors(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "dataset_dict.json").write_text('{"splits": ["train"]}')  # save_to_disk cut short
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    for source, needle in ((tmp_path / "half", "cannot load this save_to_disk folder (FileNotFoundError: "),
                           (tmp_path / "bad.jsonl", "cannot read it (")):
        rc, _, err = run_main(["train", "--dry-run", f"data.dataset={source}", f"data.cache_dir={tmp_path / 'c'}"])
        assert rc == 2 and err.count("\n") == 1 and needle in err, err
