"""`data.dataset`: a `datasets` dataset as the engine's rows - a `save_to_disk` folder (DatasetDict or Dataset), a
folder or glob of parquet / JSON / CSV / text files (read by `load_dataset`'s builders), or a hub id.

What comes out is plain Python: the texts of a column, (text, label) records with the label names a `ClassLabel`
column carries, or (prompt, completion) pairs; or, streaming, the split as a `datasets` IterableDataset. Every
problem a user will hit - a path that is not there, a hub id offline, a missing split, a missing column (the ones
there are are listed), a label column the classifier cannot use, a split left empty after dropping empty texts - is
a one-line `DataError` raised before any tokenizing or model load.
"""

from __future__ import annotations

import glob
from pathlib import Path

from engine.errors import DataError
from engine.notices import drop_late_console_handler

# File extension -> the `load_dataset` builder that reads it.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv",
            ".txt": "text", ".text": "text"}
GLOB_CHARS = "*?["


def _quiet() -> None:
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    drop_late_console_handler("datasets")


def is_saved_dataset(folder: Path) -> bool:
    """A `save_to_disk` folder: a DatasetDict (dataset_dict.json) or a Dataset (state.json + dataset_info.json)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in BUILDERS or any(c in spec for c in GLOB_CHARS)


def data_files(spec: str) -> tuple[str, list[str]]:
    """The builder and the sorted files of a file path or glob; one builder for all of them."""
    files = sorted(glob.glob(spec, recursive=True)) if any(c in spec for c in GLOB_CHARS) else [spec]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise DataError(f"data.dataset={spec}: no files match it")
    kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        odd = next(f for f in files if Path(f).suffix.lower() not in BUILDERS)
        raise DataError(f"data.dataset={spec}: {odd} is not a parquet, JSON (.json/.jsonl), CSV or text (.txt) file")
    if len(kinds) > 1:
        raise DataError(f"data.dataset={spec}: mixes file types ({', '.join(sorted(kinds))}): give files of one type")
    return kinds.pop(), files


def _hub_error(spec: str, e: Exception) -> DataError:
    name = spec.rstrip("/").split("/")[-1]
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DataError(
        f"data.dataset={spec}: not a local folder, file or glob, and the hub could not give it ({reason[:160]}): where "
        f"there is network, run python -c \"import datasets; datasets.load_dataset('{spec}').save_to_disk('{name}')\" "
        f"and pass data.dataset={name} (the folder)")


def root_cause(e: BaseException) -> str:
    """The innermost error of a chain (datasets wraps a parse error in DatasetGenerationError), as one short line."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = str(e).splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def open_splits(spec: str, cache_dir: Path, streaming: bool = False) -> dict:
    """The named splits of `spec` (a split name -> Dataset, or IterableDataset when streaming)."""
    import datasets

    _quiet()
    path = Path(spec).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        try:
            saved = datasets.load_from_disk(str(path))
        except Exception as e:  # a damaged or partial save_to_disk folder
            raise DataError(f"data.dataset={spec}: cannot load this save_to_disk folder ({root_cause(e)})") from None
        splits = dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
        return {k: v.to_iterable_dataset() for k, v in splits.items()} if streaming else splits
    # Local files and hub ids are cached apart: offline, datasets falls back to a cached dataset of the same name,
    # which must never be a local folder that happens to share the hub id's name.
    kw = {"cache_dir": str(cache_dir / "files"), "streaming": streaming}
    try:
        if path.is_dir():
            return dict(datasets.load_dataset(str(path), **kw))
        if path.is_file() or any(c in spec for c in GLOB_CHARS):
            builder, files = data_files(str(path) if path.is_file() else spec)
            return dict(datasets.load_dataset(builder, data_files={"train": files}, **kw))
    except DataError:
        raise
    except Exception as e:  # the builders' own parse errors: one line naming the source
        raise DataError(f"data.dataset={spec}: cannot read it ({root_cause(e)})") from None
    if _looks_like_path(spec):
        raise DataError(f"data.dataset={spec}: no such file or folder")
    try:
        return dict(datasets.load_dataset(spec, **{**kw, "cache_dir": str(cache_dir / "hub")}))
    except Exception as e:  # offline (ConnectionError), unknown id, gated: all the same advice
        raise _hub_error(spec, e) from None


def pick_split(splits: dict, name: str, spec: str, key: str = "data.split"):
    if name not in splits:
        raise DataError(f"{key}={name}: data.dataset={spec} has no such split (splits: {', '.join(splits)})")
    return splits[name]


def column_names(ds) -> list[str]:
    names = ds.column_names
    if names is None:  # a stream whose builder does not know its columns before reading
        names = list(next(iter(ds.take(1)), {}).keys())
    return list(names)


def check_columns(ds, fields: list[tuple[str, str]], where: str) -> None:
    """Each of `fields` ((column, the key that names it)) is a column of `ds`; the error lists the ones there are."""
    have = column_names(ds)
    for f, key in fields:
        if f not in have:
            raise DataError(f"{where} has no column {f!r} (columns: {', '.join(have)}): set {key}")


def _dtype(ds, field: str) -> str:
    feature = (ds.features or {}).get(field)
    return getattr(feature, "dtype", type(feature).__name__)


def check_text_column(ds, field: str, key: str, where: str) -> None:
    dtype = _dtype(ds, field)
    if ds.features is not None and dtype not in ("string", "large_string"):
        raise DataError(f"{where}: column {field!r} holds {dtype} values, not text: set {key} to a text column")


def texts(ds, field: str, where: str) -> list[str]:
    """The non-empty texts of one column (rows with empty or null text add nothing to a language model)."""
    check_columns(ds, [(field, "data.text_field")], where)
    check_text_column(ds, field, "data.text_field", where)
    out = [t for t in ds[field] if isinstance(t, str) and t.strip()]
    if not out:
        raise DataError(f"{where} has no non-empty text in column {field!r} ({len(ds)} rows)")
    return out


def prompt_completions(ds, prompt_field: str, completion_field: str, where: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs; rows with no completion text are dropped (they have nothing to learn)."""
    check_columns(ds, [(prompt_field, "data.prompt_field"), (completion_field, "data.completion_field")], where)
    for f, key in ((prompt_field, "data.prompt_field"), (completion_field, "data.completion_field")):
        check_text_column(ds, f, key, where)
    out = [(p or "", c) for p, c in zip(ds[prompt_field], ds[completion_field]) if isinstance(c, str) and c.strip()]
    if not out:
        raise DataError(f"{where} has no row with a non-empty {completion_field!r} ({len(ds)} rows)")
    return out


def _label_kind(ds, field: str, where: str) -> tuple[str, list[str] | None]:
    """int | str | class (a ClassLabel, whose names come along); other types are an error saying what to do."""
    import datasets

    feature = ds.features[field]
    if isinstance(feature, datasets.ClassLabel):
        return "class", list(feature.names)
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return "str", None
    if isinstance(dtype, str) and dtype.startswith(("int", "uint")):
        return "int", None
    shown = dtype or type(feature).__name__
    raise DataError(f"{where}: label column {field!r} holds {shown} values, which a classifier cannot use as classes: "
                    f"give class names (strings) or integer class ids (e.g. ds.cast_column({field!r}, "
                    "datasets.Value('int64'))), or set data.label_field")


def labelled_records(ds, text_field: str, label_field: str, where: str) -> tuple[list[tuple[str, str]], list[str] | None]:
    """(text, label) records with labels as strings (a ClassLabel's ints as its names), and the ClassLabel's names.
    Rows with an empty text are dropped; a missing label is an error naming the row."""
    check_columns(ds, [(text_field, "data.text_field"), (label_field, "data.label_field")], where)
    check_text_column(ds, text_field, "data.text_field", where)
    kind, names = _label_kind(ds, label_field, where)
    rows = []
    for i, (text, label) in enumerate(zip(ds[text_field], ds[label_field])):
        if not (isinstance(text, str) and text.strip()):
            continue
        if label is None or (kind == "str" and not label.strip()):
            raise DataError(f"{where} row {i}: no label in {label_field!r}")
        rows.append((text, names[label] if kind == "class" else str(label).strip()))
    if not rows:
        raise DataError(f"{where} has no non-empty text in column {text_field!r} ({len(ds)} rows)")
    return rows, names


def describe(spec: str, split: str) -> str:
    return f"data.dataset={spec} split {split!r}"

