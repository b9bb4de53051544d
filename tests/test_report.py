"""Watching runs: TensorBoard events read back, end-of-run PNGs, `engine report` over several runs, its errors."""

import json
import shutil

import pytest

from conftest import run_inprocess
from engine.cli import main
from engine.report import PLOT_FILES, draw_loss, read_run, run_names

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "tiny"
    run_inprocess(corpus, out, eval={"every_n_steps": 3}, checkpoint={"every_n_steps": 3},
                  logging={"tensorboard": True, "plots": True})
    return out


def records(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_metrics(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    recs = records(run_dir)
    steps = [r for r in recs if "loss" in r]
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("perf/tokens_per_s", "tokens_per_s"),
                     ("memory/peak_MiB", "peak_mem_mib")]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in steps], tag
        assert [e.value for e in events] == pytest.approx([r[key] for r in steps], rel=1e-6), tag
    val = acc.Scalars("eval/val_loss")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in val] == [
        (r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    assert [e.step for e in val] == [3, 6]


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint_in_tensorboard(corpus, run_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "resumed"
    shutil.copytree(run_dir, out)
    # from step 3: steps 4-6 run again, and their first values must not show twice
    run_inprocess(corpus, out, eval={"every_n_steps": 3},
                  checkpoint={"every_n_steps": 3, "resume": str(out / "checkpoints" / "step-0000003")})
    assert len(list((out / "tensorboard").iterdir())) == 2  # the first run's file and the resumed one's
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [r for r in records(out) if "loss" in r]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in steps] == list(range(1, 7))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps], rel=1e-6)


def test_plots_are_written_after_the_run(run_dir):
    from PIL import Image

    for name in PLOT_FILES:
        with Image.open(run_dir / "plots" / name) as im:
            assert im.format == "PNG" and im.width >= 800 and im.height >= 500, name


def test_report_overlays_runs_with_their_names(run_dir, tmp_path, capsys):
    # a second run to compare with: the same steps, a lower loss
    other = tmp_path / "other"
    other.mkdir()
    recs = records(run_dir)
    for r in recs:
        for k in ("loss", "val_loss"):
            if k in r:
                r[k] -= 1.0
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "cmp"
    assert main(["report", str(run_dir), str(other), "--out", str(out)]) == 0
    assert "wrote 5 plots of 2 run(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOT_FILES)

    from matplotlib.figure import Figure

    ax = Figure().subplots()
    draw_loss(ax, [read_run(run_dir), read_run(other)])
    labels = ax.get_legend_handles_labels()[1]
    assert {"tiny: train", "tiny: validation", "other: train", "other: validation"} <= set(labels)


def test_run_names_tell_same_named_folders_apart(tmp_path):
    assert run_names([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]) == ["a/run", "b/run", "c"]


def test_report_of_one_run_redraws_its_plots(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("plots", "checkpoints", "model"))
    assert main(["report", str(copy)]) == 0
    assert sorted(p.name for p in (copy / "plots").iterdir()) == sorted(PLOT_FILES)


def test_a_killed_runs_half_written_last_line_is_ignored(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "lr": 0.1}\n{"step": 2, "lo')
    assert len(read_run(tmp_path).train) == 1


@pytest.mark.parametrize("setup,needle", [
    (None, "no such run folder"),
    ("", "no metrics.jsonl here"),
    ('{"step": 1, "loss": 3.0}\nnot json\n{"step": 2, "loss": 2.0}\n', "line 2 is not JSON"),
    ('{"step": 1, "val_loss": 3.0}\n', "records no training step"),
])
def test_bad_run_dir_is_one_line_without_traceback(tmp_path, capsys, setup, needle):
    d = tmp_path / "run"
    if setup is not None:
        d.mkdir()
        if setup:
            (d / "metrics.jsonl").write_text(setup)
    assert main(["report", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1 and "Traceback" not in err
