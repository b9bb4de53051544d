"""`engine sweep`: a 3-trial optuna search on a tiny GPT-2 (grid over the learning rate): one trial at a learning rate
too small to learn is pruned at a periodic eval, the best config is written and trains as it ran; the study is a
SQLite file, so the same command continues it; bad search spaces are one-line errors."""

import json

import pytest
import yaml

from conftest import flat_overrides, run_main, tiny_overrides


def base_overrides(corpus, tmp_path) -> list[str]:
    cfg = tiny_overrides(corpus, tmp_path / "unused", train={"max_steps": 6}, eval={"every_n_steps": 2},
                         optim={"lr": 1e-3}, logging={"tensorboard": False})
    cfg["logging"].pop("output_dir")
    return flat_overrides(cfg)


SPACE = {"trials": 3, "sampler": "grid", "seed": 0, "pruning": {"startup_trials": 1, "warmup_evals": 0},
         "space": {"optim.lr": {"choices": [1e-2, 1e-7, 3e-8]}}}


def test_a_three_trial_sweep_prunes_and_writes_the_best_config(corpus, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "sweep"
    rc, stdout, err = run_main(["sweep", tmp_path / "space.yaml", "--output", out, *base_overrides(corpus, tmp_path)])
    assert rc == 0, err[-3000:]
    table = stdout[stdout.index("trial  state"):]
    print(table)
    states = [line.split()[1] for line in table.splitlines()[2:5]]
    assert sorted(states).count("pruned") >= 1 and "complete" in states, table
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["optim"]["lr"] == 1e-2 and best["logging"]["output_dir"] == str(out / "best")
    number = int(next(l for l in table.splitlines() if "*" in l.split()[0]).split()[0].rstrip("*"))
    summary = json.loads((out / f"trial-{number:03d}" / "summary.json").read_text())
    assert f"{summary['val_loss']:.4f}" in table
    pruned = [l.split()[-1] for l in table.splitlines()[2:5] if " pruned " in l]
    assert not (tmp_path / pruned[0] / "summary.json").exists()  # ended at its eval, no export

    # the study lives on: asking for 4 trials in all runs... none more here (the grid has 3 points)
    rc, stdout, err = run_main(["sweep", tmp_path / "space.yaml", "--output", out, "--trials", "4",
                                *base_overrides(corpus, tmp_path)])
    assert rc == 0 and "sweep: 0 trial(s) to run" in stdout, err[-2000:]


@pytest.mark.parametrize("space,needle", [
    ({"space": {"optim.lrr": {"low": 1e-4, "high": 1e-2}}}, "optim.lrr=0.0001 does not make a valid run config: optim.lrr: unknown key"),
    ({"space": {"optim.lr": {"low": 1e-2, "high": 1e-4}}}, "space.optim.lr: low=0.01 must be below high=0.0001"),
    ({"space": {"optim.lr": {"low": 0.0, "high": 1e-2, "log": True}}}, "log=true needs low > 0"),
    ({"space": {}}, "space is empty"),
    ({"space": {"optim.lr": {"choices": []}}}, "choices is empty"),
    ({"space": {"optim.lr": {"low": 1e-4}}}, "needs low and high (or choices)"),
    ({"space": {"optim.lr": {"low": 1e-4, "high": 1e-2}}, "sampler": "grid"}, "sampler: grid needs choices"),
    ({"space": {"memory.lora.r": {"choices": [0, 8]}}}, "memory.lora.r=0 does not make a valid run config"),
    ({"space": {"optim.lr": {"low": 1e-4, "high": 1e-2, "typo": 1}}}, "space.optim.lr.typo: Extra inputs"),
    ({"trials": 0, "space": {"optim.lr": {"choices": [1e-3]}}}, "trials: Input should be greater than 0"),
])
def test_bad_search_spaces_are_one_line_errors(tmp_path, space, needle):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    rc, _, err = run_main(["sweep", tmp_path / "s.yaml", "--output", tmp_path / "out"])
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_a_sweep_needs_a_validation_split(corpus, tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"space": {"optim.lr": {"choices": [1e-3]}}}))
    rc, _, err = run_main(["sweep", tmp_path / "s.yaml", "--output", tmp_path / "out",
                           *base_overrides(corpus, tmp_path), "data.validation_file=null"])
    assert rc == 2 and "scores each trial by its validation loss" in err, err


def test_a_trial_left_running_by_an_interrupted_sweep_runs_again_first(tmp_path):
    from engine.sweep import SweepSpace, open_study, suggest

    space = SweepSpace.model_validate({"trials": 3, "space": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}})
    study = open_study(tmp_path, space)
    done = study.ask()
    study.tell(done, 1.0)
    cut = study.ask()
    params = suggest(cut, space)  # the sweep died while this trial ran
    again = open_study(tmp_path, space)
    states = [t.state.name for t in again.trials]
    assert states == ["COMPLETE", "FAIL", "WAITING"]
    assert suggest(again.ask(), space) == params
