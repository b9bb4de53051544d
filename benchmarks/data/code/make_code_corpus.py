"""Make the quality benchmark's second fine-tuning domain, the hard shift: Python source code from CPython's standard
library (functions and methods, their docstrings removed so nothing overlaps the docs domain), one function per JSON
line. Code is far from the pretraining corpus' short stories in vocabulary (identifiers, operators, indentation) and
in style. Deduplicated, shuffled with a fixed seed, cut to about the docs domain's size, split into train/valid. The
committed .jsonl files are what the benchmark reads; this script only says where they came from (run with CPython
3.11; another version gives other source):

    python3 benchmarks/data/code/make_code_corpus.py
"""

import ast
import importlib
import inspect
import json
import random
import textwrap
from pathlib import Path

MODULES = """argparse ast bisect calendar configparser csv dataclasses difflib email.message enum fractions ftplib
functools gettext heapq http.cookiejar ipaddress json.decoder json.encoder logging mailbox optparse pathlib pprint
shlex shutil smtplib statistics string tarfile tempfile textwrap tokenize urllib.parse zipfile""".split()
TRAIN_CHARS, VALID_CHARS = 414_000, 46_000  # about the docs domain's train.txt / valid.txt


def functions(module):
    for _, obj in inspect.getmembers(module):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield obj
        elif inspect.isclass(obj):
            for _, member in inspect.getmembers(obj):
                if inspect.isfunction(member) and member.__qualname__.startswith(obj.__name__ + "."):
                    yield member


def without_docstring(source: str) -> str | None:
    """The function's source, dedented, its docstring removed (None if it does not parse on its own)."""
    source = textwrap.dedent(source)
    try:
        fn = ast.parse(source).body[0]
    except (SyntaxError, IndexError):
        return None
    body = getattr(fn, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines = source.splitlines()
        del lines[body[0].lineno - 1: body[0].end_lineno]
        source = "\n".join(lines)
    return source.strip() if len(source) >= 120 else None


def main():
    seen, texts = set(), []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for fn in functions(module):
            try:
                text = without_docstring(inspect.getsource(fn))
            except (OSError, TypeError):
                continue
            if text and text not in seen and len(text) < 6000:
                seen.add(text)
                texts.append(text)
    random.Random(0).shuffle(texts)
    here = Path(__file__).parent
    valid, train, n = [], [], 0
    for t in texts:
        (valid if n < VALID_CHARS else train).append(t)
        n += len(t)
        if n >= VALID_CHARS + TRAIN_CHARS:
            break
    for name, rows in (("train", train), ("valid", valid)):
        with open(here / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for t in rows:
                f.write(json.dumps({"text": t}) + "\n")
        print(f"{name}: {len(rows)} functions, {sum(map(len, rows)):,} characters")


if __name__ == "__main__":
    main()
