"""launch/colab.ipynb top to bottom in a real Jupyter kernel, on CPU, with a tiny model injected as parameters."""

import json

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow

NOTEBOOK = ROOT / "launch" / "colab.ipynb"


def inject_parameters(nb, params: dict) -> None:
    """papermill's convention: a cell after the one tagged `parameters` overrides its values."""
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]}))


def outputs_text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def test_colab_notebook_runs_end_to_end_on_cpu(corpus, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    out, drive = tmp_path / "run", tmp_path / "MyDrive"
    drive.mkdir()  # stands in for a mounted /content/drive/MyDrive
    inject_parameters(nb, {
        "INSTALL": False,
        "PROJECT_DIR": str(ROOT),
        "TRAIN_FILE": str(corpus["train"]),
        "VALID_FRACTION": 0.1,
        "OVERRIDES": ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_positions=64",
                      "data.block_size=32", "train.max_steps=6", "train.micro_batch_size=4", "eval.every_n_steps=3",
                      "eval.max_batches=2", "checkpoint.every_n_steps=0", "sample.max_new_tokens=0",
                      f"data.cache_dir={tmp_path / 'cache'}"],
        "OUTPUT_DIR": str(out),
        "SHOW_TENSORBOARD": False,
        "PROMPTS": ["The cat"],
        "MAX_NEW_TOKENS": 6,
        "DRIVE_DIR": str(drive / "gpt2-memengine"),
    })
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # to read when it fails
    text = outputs_text(nb)
    assert "preset cpu_default (no GPU" in text
    assert f"training on {corpus['train']}" in text
    assert "final: val_loss" in text and "6 steps: train loss" in text
    assert "--- 'The cat'\nThe cat" in text
    assert f"saved to {drive / 'gpt2-memengine' / 'run'}" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the inline loss plot and the run's overview.png
    saved = drive / "gpt2-memengine" / "run"
    assert (saved / "model" / "model.safetensors").exists() and (saved / "plots" / "overview.png").exists()
    assert (saved / "tensorboard").is_dir() and not (saved / "checkpoints").exists()
