"""What stops a run early without losing it: a preemption signal, and a run of non-finite steps.

Both are checked at step boundaries by the loop in `engine/train.py`, which saves a checkpoint before stopping.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from dataclasses import dataclass

MIN_LOSS_SCALE = 1.0  # as DeepSpeed's min_loss_scale in make_ds_config and DynamicLossScale's floor


class StopSignal:
    """SIGTERM (preemption: Colab, spot nodes, SLURM) and SIGINT set a flag; the loop finishes the step it is in,
    saves and exits 0. A second Ctrl-C aborts at once. Handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping"
              + (" (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@dataclass
class BadStepGuard:
    """Counts consecutive steps whose loss is not finite or whose fp16 step was skipped for overflow."""

    limit: int
    run: int = 0
    first: int | None = None

    def check(self, step: int, loss: float, skipped: bool, loss_scale: float | None) -> str | None:
        """None, or why the run must stop now."""
        if math.isfinite(loss) and not skipped:
            self.run, self.first = 0, None
            return None
        self.run += 1
        self.first = self.first or step
        fix = "use memory.precision=bf16 if the GPU supports it (fp16's range overflows), or a lower optim.lr"
        if skipped and loss_scale is not None and loss_scale <= MIN_LOSS_SCALE:
            return (f"the fp16 loss scale reached its minimum ({MIN_LOSS_SCALE:g}) at step {step}: gradients overflow "
                    f"even unscaled; {fix}")
        if self.limit and self.run >= self.limit:
            what = "had a non-finite loss or skipped an fp16 overflow"
            return f"{self.run} consecutive steps (from step {self.first}) {what}; {fix}"
        return None

    def state_dict(self) -> dict:
        return {"run": self.run, "first": self.first}

    def load_state_dict(self, st: dict) -> None:
        self.run, self.first = st.get("run", 0), st.get("first")
