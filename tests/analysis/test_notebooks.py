"""The analysis notebooks execute headless (nbclient) against a small MLflow store the test makes."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from analysis_store import make_store
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "analysis"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(autouse=True)
def report_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCOLAB_REPORT_DIR", str(tmp_path / "reports" / "notebook"))


def execute(name: str, folder: Path) -> nbformat.NotebookNode:
    """Run the notebook in ``folder``; its plots go to ``folder/reports/notebook`` (MOCOLAB_REPORT_DIR)."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return book


def text_outputs(book: nbformat.NotebookNode) -> str:
    parts = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.parametrize("sweep, expected", [("momentum_test", "59.0 ± 1.4"), ("mechanism_test", "53.0 ± 1.4")])
def test_ablation_notebook_tabulates_a_sweep(store, tmp_path, monkeypatch, sweep, expected):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MOCOLAB_SWEEP", sweep)
    monkeypatch.delenv("MOCOLAB_EXPERIMENT", raising=False)
    book = execute("ablation.ipynb", tmp_path)
    text = text_outputs(book)
    assert expected in text and "(MLflow run " in text
    images = [o for c in book.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook shows its plots"
    assert any((tmp_path / "reports" / "notebook").glob("*.png"))


def test_compare_runs_notebook_lists_runs_and_curves(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MOCOLAB_EXPERIMENT", "sweeps")
    monkeypatch.setenv("MOCOLAB_RUNS", "momentum_test-00000,momentum_test-00007")
    book = execute("compare_runs.ipynb", tmp_path)
    text = text_outputs(book)
    assert "2 run(s) of experiment sweeps" in text and "moco.momentum" in text
    assert (tmp_path / "reports" / "notebook" / "compare_knn_top1.png").is_file()
