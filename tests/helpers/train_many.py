"""A launcher entry point that trains several runs one after another in the same processes (env RUNS: a JSON file
holding a list of {"overrides": [...], "bad_gradient": {"rank": R, "call": N, "kind": "nan"|"inf"} (optional)}):
one launcher start and one process group for every 2-rank run of the test suite (tests/two_ranks.py). A run with
"bad_gradient" gives rank R alone a non-finite gradient from its N-th loss on (tests/helpers/bad_gradient.py).
Stops at the first run that fails."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bad_gradient import poisoned_losses  # noqa: E402

from engine.cli import main  # noqa: E402

if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    for run in json.loads(Path(os.environ["RUNS"]).read_text()):
        bad = run.get("bad_gradient")
        with poisoned_losses(rank, bad["rank"], bad["call"], bad["kind"]) if bad else poisoned_losses(rank, -1, 0):
            rc = main(["train", *run["overrides"]])
        if rc:
            sys.exit(rc)
