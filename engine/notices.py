"""Where the libraries' own notices go (deprecations, optional kernels they could not load): a log file, not the
console, which carries what the user can act on. Used by the CLI for a command's duration and by worker processes
(the planner's simulations) for theirs."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

LIBRARY_LOGGERS = ("bitsandbytes", "deepspeed", "DeepSpeed", "transformers", "peft", "datasets", "torch", "accelerate",
                   "torchao", "optuna", "huggingface_hub", "py.warnings")  # (the hub's: its retries when offline)


def library_log_path() -> Path:
    """Where the libraries' own notices go: $ENGINE_LOG, else engine.log in the engine's cache folder."""
    if os.environ.get("ENGINE_LOG"):
        return Path(os.environ["ENGINE_LOG"])
    return Path(os.environ.get("ENGINE_CACHE", Path.home() / ".cache" / "gpt2-memengine")) / "engine.log"


@contextlib.contextmanager
def library_notices_to_file(path: Path):
    """Route the libraries' logging (and Python warnings) to `path` for the duration; restore everything after."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    except OSError:
        handler = logging.NullHandler()  # no writable log folder: the notices are dropped, never printed
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    saved = [(name, logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in LIBRARY_LOGGERS]
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in lg.handlers[:]:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)  # the library's own console handler (DeepSpeed installs one)
        lg.addHandler(handler)
        lg.propagate = False
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        for name, handlers, propagate in saved:
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.propagate = propagate
        handler.close()


def drop_late_console_handler(name: str) -> None:
    """A library imported while the notices are routed (`datasets`, imported on first use) adds its console handler
    after the routing did: drop it, so its notices go to the file too. Outside the routing nothing changes."""
    lg = logging.getLogger(name)
    console = [h for h in lg.handlers if type(h) is logging.StreamHandler]
    if console and not lg.propagate and len(console) < len(lg.handlers):
        for h in console:
            lg.removeHandler(h)


WORKER_STDERR = "ENGINE_WORKER_STDERR"


def stderr_to_file(path: Path | str) -> None:
    """This whole process's stderr (file descriptor 2) appended to `path` (a worker's; best effort)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return
    os.dup2(fd, 2)
    os.close(fd)


@contextlib.contextmanager
def workers_log_to(path: Path):
    """Processes started inside send their stderr to `path` from their first import of `engine` on (the variable is
    inherited at their start; engine/__init__.py acts on it)."""
    old = os.environ.get(WORKER_STDERR)
    os.environ[WORKER_STDERR] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(WORKER_STDERR, None)
        else:
            os.environ[WORKER_STDERR] = old
