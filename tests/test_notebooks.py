"""The analysis notebooks run headless against an MLflow store and draw their plots."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_fixture import assert_not_blank, build_store  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "analysis" / "notebooks"
PLOTS = {
    "pareto.ipynb": {"acc_vs_params.png", "acc_vs_latency.png", "size_heatmap.png"},
    "temperature.ipynb": {"acc_vs_temperature.png", "acc_vs_kd_weight.png",
                          "learning_curves.png"},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.getbasetemp() / "mlflow_store")


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_notebook_is_thin(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for word in ("def ", "class ", "lambda"):
        assert word not in code, f"{name} defines something ({word.strip()}): move it to analysis/"
    assert code.count("analysis.") >= 5


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_notebook_executes_and_draws(name, store, tmp_path, monkeypatch):
    plots = tmp_path / "plots"
    # the kernel inherits this process's environment: the notebook's first cell reads it
    monkeypatch.setenv("KD_TRACKING_URI", store.tracking_uri)
    monkeypatch.setenv("KD_EXPERIMENT", store.experiment)
    monkeypatch.setenv("KD_PLOTS_DIR", str(plots))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    assert {p.name for p in plots.glob("*.png")} == PLOTS[name]
    for png in plots.glob("*.png"):
        assert_not_blank(png)
    shown = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                for o in c.outputs)
    assert shown >= 2  # the figures are displayed inline, not only saved
