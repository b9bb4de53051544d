"""Re-record tests/data/plan_figures_gpt2-xl_t4.json (the planner's simulated figures for gpt2-xl on one T4, every
candidate at micro-batch 1 and 2), after a change to the simulation:

    .venv/bin/python tests/data/record_plan_figures.py      # ~2 min on a 2-core CPU
"""

import json
from pathlib import Path

from engine.memory.gpus import GPUS
from engine.plan import Request, gather_figures

if __name__ == "__main__":
    req = Request(model="gpt2-xl", gpu=GPUS["t4"], gpus=1, seq_len=1024)
    figures = gather_figures(req, every_micro=True)
    out = Path(__file__).with_name("plan_figures_gpt2-xl_t4.json")
    out.write_text(json.dumps({"request": {"model": req.model, "gpu": "t4", "gpus": req.gpus, "seq_len": req.seq_len},
                               "figures": figures}))
    print(f"wrote {out} ({len(figures)} candidates)")
