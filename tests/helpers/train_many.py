"""A launcher entry point that trains several runs one after another in the same processes (env RUNS: a JSON file
holding a list of override lists): one launcher start and one process group for a chain of tests' runs
(tests/test_layout_change.py). Stops at the first run that fails."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.cli import main  # noqa: E402

if __name__ == "__main__":
    for overrides in json.loads(Path(os.environ["RUNS"]).read_text()):
        rc = main(["train", *overrides])
        if rc:
            sys.exit(rc)
