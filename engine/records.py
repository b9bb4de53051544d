"""One reader for every data file: plain text (a record per non-empty line), JSONL and CSV (a header row).

Every problem (missing, empty, binary, non-UTF-8, bad JSON, missing field or column) is a one-line `DataError`
naming the file and line, raised before any tokenizing or model load.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from engine.errors import DataError

ASSETS = Path(__file__).parent / "assets"
# The data shipped with the engine: the default run's corpus and the classification example's sentiment set.
SAMPLE_CORPUS = {split: ASSETS / "corpus" / f"{name}.txt" for split, name in
                 (("train", "train"), ("validation", "valid"), ("test", "test"))}
SAMPLE_SENTIMENT = {split: ASSETS / "sentiment" / f"{name}.csv" for split, name in
                    (("train", "train"), ("validation", "valid"), ("test", "test"))}

Record = tuple[str, "str | None"]  # (text, label as a string, or None when the file has no labels)


def file_format(path: Path, fmt: str = "auto") -> str:
    """text | jsonl | csv: `fmt` unless it is auto, else by extension."""
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    return "jsonl" if suffix in (".jsonl", ".json", ".ndjson") else "csv" if suffix == ".csv" else "text"


def read_text_file(p: Path) -> str:
    """A data file's text, or a one-line DataError saying why it is not a usable UTF-8 text file."""
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if p.is_dir():
        raise DataError(f"data path is a directory, not a file: {p}")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"data file is empty: {p}")
    nul = raw.find(b"\x00", 0, 8192)
    if nul >= 0:
        raise DataError(f"data file looks binary (NUL byte at offset {nul}): {p}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file is not valid UTF-8: {p} (byte offset {e.start}: {raw[e.start:e.start + 1]!r})") from None
    return text[1:] if text.startswith("\ufeff") else text


def _label(value, where: str, label_field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label {label_field!r} must be a string or an integer, got {value!r}")
    value = str(value).strip()
    if not value:
        raise DataError(f"{where}: empty label in {label_field!r}")
    return value


def _record(text, label, where: str, text_field: str, label_field: str | None, require_label: bool) -> Record | None:
    """One validated record; None for an empty text in unlabelled data (it adds nothing to a language model)."""
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is not a string")
    if not text.strip():
        if label_field is None:
            return None
        raise DataError(f"{where}: empty text in {text_field!r}")
    if label_field is None or (label is None and not require_label) or (label == "" and not require_label):
        return text, None
    return text, _label(label, where, label_field)


def read_records(path: str | Path, fmt: str = "auto", text_field: str = "text", label_field: str | None = None,
                 require_label: bool = True) -> list[Record]:
    """(text, label) records of a text, JSONL or CSV file. `label_field=None`: unlabelled data (labels None).
    `require_label=False` (labelling new text): a missing label field or column is allowed."""
    p = Path(path)
    kind = file_format(p, fmt)
    text = read_text_file(p)
    need = label_field is not None and require_label
    rows: list[Record | None] = []
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        cols = reader.fieldnames or []
        missing = [f for f in (text_field, label_field if need else None) if f and f not in cols]
        if missing:
            raise DataError(f"{p}: no column {missing[0]!r} in the header ({', '.join(cols)}); set data.text_field / "
                            "data.label_field")
        for i, r in enumerate(reader, 2):
            if None in r:
                raise DataError(f"{p} line {i}: more fields than the header has (quote texts that contain commas)")
            rows.append(_record(r.get(text_field) or "", r.get(label_field) if label_field else None, f"{p} line {i}",
                                text_field, label_field, require_label))
    elif kind == "jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{p} line {i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise DataError(f"{where}: no {text_field!r} field (set data.text_field)")
            if need and label_field not in obj:
                raise DataError(f"{where}: no {label_field!r} field (set data.label_field)")
            rows.append(_record(obj[text_field], obj.get(label_field) if label_field else None, where, text_field,
                                label_field, require_label))
    else:
        if need:
            raise DataError(f"{p}: labelled data must be CSV or JSONL (.csv/.jsonl, or set data.format)")
        rows = [(line, None) for line in text.splitlines() if line.strip()]
    out = [r for r in rows if r is not None]
    if not out:
        raise DataError(f"data file has no text: {p}")
    return out


PROMPT_SLOT = "{prompt}"


def fill_prompt(template: str, prompt: str) -> str:
    """A prompt as prompt/completion training writes it before the completion (`data.prompt_template`, `{prompt}`
    replaced); `engine generate` writes prompts the same way, so sampling sees what training saw."""
    return template.replace(PROMPT_SLOT, prompt)


def _pair(obj: dict, where: str, prompt_field: str, completion_field: str) -> tuple[str, str]:
    for f, key in ((prompt_field, "data.prompt_field"), (completion_field, "data.completion_field")):
        if f not in obj:
            raise DataError(f"{where}: no {f!r} field (fields: {', '.join(obj)}); set {key}")
        if not isinstance(obj[f], str):
            raise DataError(f"{where}: field {f!r} is not a string")
    if not obj[completion_field].strip():
        raise DataError(f"{where}: empty completion in {completion_field!r} (nothing to learn)")
    return obj[prompt_field], obj[completion_field]


def read_prompt_completions(path: str | Path, fmt: str, prompt_field: str, completion_field: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a JSONL or CSV file (`data.prompt_field`, `data.completion_field`)."""
    p = Path(path)
    kind = file_format(p, fmt)
    text = read_text_file(p)
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [_pair(r, f"{p} line {i}", prompt_field, completion_field) for i, r in enumerate(reader, 2)]
    if kind != "jsonl":
        raise DataError(f"{p}: prompt/completion pairs must be JSONL or CSV (.jsonl/.csv, or set data.format)")
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p} line {i}: not a JSON object")
        out.append(_pair(obj, f"{p} line {i}", prompt_field, completion_field))
    return out
