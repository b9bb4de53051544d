#!/usr/bin/env python3
"""Generate the engine's sample classification data (train.csv, valid.csv, test.csv).

A small synthetic sentiment task in the shape of IMDB-style review classification, but with three
labels (negative, neutral, positive) so per-class scores mean something. Every line is built by this
script from hand-written templates: short reviews of everyday things (a film, a hotel room, a bakery,
a phone ...). No third-party text is used.

What makes it more than keyword spotting:
- negation: "The soup was not bad at all" is positive, "The hotel was not great" is negative;
- a turn: "At first the film felt dull, but in the end it was wonderful" takes the label of the end;
- neutral lines use the same subjects and some of the same words in factual statements.

Output is deterministic: the same --seed and sizes give byte-identical files on any Python 3
(only random.Random with an integer seed and ordered containers are used). The splits use the seeds
seed, seed + 1 and seed + 2; texts are distinct within a split and no text occurs in two splits.
Format: CSV (RFC 4180, `\\n` line endings) with a header `text,label`.

Usage::

    python make_sentiment.py                       # writes next to this script
    python make_sentiment.py --out-dir /tmp/s --seed 7 --train 200 --valid 60 --test 0
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random

LABELS = ("negative", "neutral", "positive")

SUBJECTS = [
    "the film", "the soup", "this hotel", "the new phone", "the concert", "our waiter", "the book", "the train ride",
    "the museum", "this laptop", "the pasta", "the service", "the room", "the game", "the coffee", "the show",
    "the bakery", "the bike", "the garden tour", "the app", "the bus driver", "the campsite", "the sequel", "the pizza",
]
POSITIVE = ["wonderful", "great", "delightful", "excellent", "lovely", "superb", "charming", "fantastic", "brilliant",
            "pleasant", "good", "friendly", "fresh", "cozy"]
NEGATIVE = ["awful", "terrible", "dreadful", "boring", "disappointing", "rude", "broken", "bland", "noisy", "horrible",
            "bad", "dirty", "slow", "cold"]
POS_CLOSERS = ["I loved it", "I would gladly go back", "I highly recommend it", "it made my day", "it was worth every coin",
               "we will return soon", "five stars from me"]
NEG_CLOSERS = ["I hated it", "what a waste of money", "never again", "it ruined my evening", "I want a refund",
               "avoid it", "one star from me"]
NEUTRAL_FACTS = [
    "opens at nine in the morning", "is on the second floor", "was about two hours long", "costs twelve coins",
    "is next to the station", "was reviewed in the paper on Monday", "comes in three colours", "has a long menu",
    "was built last year", "is closed on Sundays", "was mentioned by a friend", "takes about ten minutes to reach",
]
NEUTRAL_OPENERS = ["For the record,", "Note:", "FYI,", "As far as I know,", "Apparently", "We were told that"]
INTENSIFIERS = ["", "really ", "truly ", "very ", "quite ", "so "]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def positive(rng: random.Random) -> str:
    subj = rng.choice(SUBJECTS)
    kind = rng.random()
    if kind < 0.45:
        return f"{_cap(subj)} was {rng.choice(INTENSIFIERS)}{rng.choice(POSITIVE)}."
    if kind < 0.65:
        return f"{_cap(subj)} was {rng.choice(POSITIVE)} and {rng.choice(POSITIVE)}; {rng.choice(POS_CLOSERS)}."
    if kind < 0.85:
        return f"{_cap(subj)} was not {rng.choice(NEGATIVE)} at all."
    return f"At first {subj} seemed {rng.choice(NEGATIVE)}, but in the end it was {rng.choice(POSITIVE)}."


def negative(rng: random.Random) -> str:
    subj = rng.choice(SUBJECTS)
    kind = rng.random()
    if kind < 0.45:
        return f"{_cap(subj)} was {rng.choice(INTENSIFIERS)}{rng.choice(NEGATIVE)}."
    if kind < 0.65:
        return f"{_cap(subj)} was {rng.choice(NEGATIVE)} and {rng.choice(NEGATIVE)}; {rng.choice(NEG_CLOSERS)}."
    if kind < 0.85:
        return f"{_cap(subj)} was not {rng.choice(POSITIVE)} at all."
    return f"At first {subj} seemed {rng.choice(POSITIVE)}, but in the end it was {rng.choice(NEGATIVE)}."


def neutral(rng: random.Random) -> str:
    subj = rng.choice(SUBJECTS)
    if rng.random() < 0.5:
        return f"{_cap(subj)} {rng.choice(NEUTRAL_FACTS)}."
    return f"{rng.choice(NEUTRAL_OPENERS)} {subj} {rng.choice(NEUTRAL_FACTS)}."


MAKERS = {"negative": negative, "neutral": neutral, "positive": positive}


def make_rows(n: int, seed: int, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """n (text, label) rows with distinct texts, none of them in `exclude`; labels drawn uniformly."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    while len(rows) < n:
        label = rng.choice(LABELS)
        text = MAKERS[label](rng)
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    return rows


def to_csv(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label"])
    w.writerows(rows)
    return buf.getvalue()


def write_splits(out_dir: str, seed: int = 2024, train: int = 600, valid: int = 150, test: int = 150) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    used: set[str] = set()  # no text of one split occurs in another
    for offset, (name, n) in enumerate((("train", train), ("valid", valid), ("test", test))):
        if n <= 0:
            continue
        rows = make_rows(n, seed + offset, used)
        used.update(t for t, _ in rows)
        path = os.path.join(out_dir, f"{name}.csv")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(to_csv(rows))
        written[name] = path
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--valid", type=int, default=150)
    ap.add_argument("--test", type=int, default=150)
    a = ap.parse_args()
    for name, path in write_splits(a.out_dir, a.seed, a.train, a.valid, a.test).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
