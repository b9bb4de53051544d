"""`engine presets`: the shipped config presets, each with its first comment line."""

from __future__ import annotations

from engine.config import preset_dir, read_yaml

NAME = "presets"
HELP = "list the shipped config presets"


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    for p in sorted(preset_dir().glob("*.yaml")):
        first = p.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        read_yaml(p)  # a broken preset is an error here, not at a user's first run
        print(f"{p.stem:28s} {first}")
    return 0
