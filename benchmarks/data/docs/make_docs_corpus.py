"""Make the quality benchmark's fine-tuning domain: English technical prose from the docstrings of Python's standard
library (a domain far from the sample corpus' short stories). One paragraph per line, deduplicated, shuffled with a
fixed seed, split into train/valid. The committed .txt files are what the benchmark reads; this script only says
where they came from (run with CPython 3.11; another version gives other docstrings):

    python3 benchmarks/data/docs/make_docs_corpus.py
"""

import importlib
import inspect
import random
import re
from pathlib import Path

MODULES = """abc argparse ast asyncio base64 bisect bz2 calendar cmd codecs collections concurrent.futures configparser
contextlib copy csv dataclasses datetime decimal difflib email enum filecmp fnmatch fractions ftplib functools gettext
glob gzip hashlib heapq hmac html.parser http.client http.server imaplib inspect io ipaddress itertools json logging
lzma mailbox mimetypes multiprocessing numbers operator optparse os pathlib pickle pkgutil platform plistlib poplib
pprint queue random re sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl
statistics string struct subprocess tarfile tempfile textwrap threading timeit tkinter tokenize trace traceback types
typing unittest urllib.parse urllib.request uuid warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile
zlib""".split()


def docstrings(module):
    yield inspect.getdoc(module) or ""
    for _, obj in inspect.getmembers(module):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for _, member in inspect.getmembers(obj):
                if inspect.isfunction(member) and member.__qualname__.startswith(obj.__name__):
                    yield inspect.getdoc(member) or ""


def paragraphs(text):
    for para in re.split(r"\n\s*\n", text):
        line = " ".join(para.split())
        # prose only: long enough, mostly letters, not a code example or a table
        if len(line) >= 80 and not line.startswith((">>>", "...", "|", "+-", "==")) and \
                sum(c.isalpha() or c == " " for c in line) > 0.85 * len(line):
            yield line


def main():
    seen, lines = set(), []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for doc in docstrings(module):
            for line in paragraphs(doc):
                if line not in seen:
                    seen.add(line)
                    lines.append(line)
    random.Random(0).shuffle(lines)
    n_valid = len(lines) // 10
    here = Path(__file__).parent
    (here / "valid.txt").write_text("\n".join(lines[:n_valid]) + "\n")
    (here / "train.txt").write_text("\n".join(lines[n_valid:]) + "\n")
    print(f"{len(lines)} paragraphs: {n_valid} valid, {len(lines) - n_valid} train")


if __name__ == "__main__":
    main()
