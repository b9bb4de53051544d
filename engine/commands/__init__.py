"""The `engine` subcommands. Each module has NAME, HELP, `add_arguments(parser)` and `run(args) -> exit code`."""

from __future__ import annotations

import argparse

from engine.commands import classify, evaluate, export, generate, plan, presets, report, sweep, train

COMMANDS = [train, sweep, plan, report, generate, evaluate, classify, export, presets]


def add_parser(subparsers, command) -> None:
    p = subparsers.add_parser(command.NAME, help=command.HELP, description=command.HELP)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    command.add_arguments(p)
    p.set_defaults(run=command.run)
