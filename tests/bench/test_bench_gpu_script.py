"""The GPU check: ``step_bench.py`` runs where only torch is installed (pydantic, Ray, MLflow, albumentations,
PyYAML, OpenCV and pandas made unimportable); ``gpu_check.sh --smoke`` runs the step timings and both input pipelines
(``pipeline_bench.py``, which needs the project's requirements) on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "platform" / "benchmarks"
NOT_ON_THE_GPU_MACHINE = ("pydantic", "ray", "mlflow", "albumentations", "yaml", "cv2", "pandas")

RUN_WITHOUT_PLATFORM_DEPS = f"""
import runpy, sys

class Hide:
    \"\"\"Wraps an import finder so that it does not see the packages the GPU machine lacks.\"\"\"
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_THE_GPU_MACHINE!r}:
            return None
        return self.finder.find_spec(name, path, target)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def test_step_bench_runs_on_cpu_with_torch_alone(tmp_path):
    out = tmp_path / "step.json"
    argv = [
        "--device",
        "cpu",
        "--arch",
        "small_cnn",
        "--image-size",
        "12",
        "--batch-size",
        "8",
        "--queue-size",
        "32",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--profile-steps",
        "1",
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_PLATFORM_DEPS, str(BENCHMARKS / "step_bench.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert set(record["img_s"]) == {"mocolab fp32", "mocolab bf16", "mocolab fp16", "mocolab bf16+cl", "reference"}
    assert record["spread"]["reference"] == {"min": 1.0, "median": 1.0, "max": 1.0, "repeats": 1}
    assert record["ratio_vs_reference"]["reference"] == 1.0
    assert sum(v for k, v in record["profile_bf16_cl"].items() if k != "momentum_queue_fraction") <= 1.0 + 1e-9
    assert "vs reference fp32" in proc.stdout and "momentum_queue_fraction" in proc.stdout


def test_step_bench_says_how_to_run_without_a_gpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_bench.py"), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2
    assert "no CUDA device visible to torch; pass --device cpu" in proc.stderr


@pytest.mark.slow
def test_gpu_check_script_smoke_run_on_cpu(tmp_path):
    proc = subprocess.run(
        [str(BENCHMARKS / "gpu_check.sh"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("vs reference fp32") == 2 and "ResNet-50 at 224" in proc.stdout
    pipelines = proc.stdout.split("== Input pipelines: decode + augmentation + step per GPU")[1]
    assert "target: 3,500 img/s per H100" in pipelines and "CPU cores per GPU" in pipelines
    rows = [row for row in map(str.split, pipelines.splitlines()) if len(row) == 4 and row[0] in ("cpu", "device")]
    assert [row[0] for row in rows] == ["cpu", "device"] and all(float(v) > 0 for row in rows for v in row[1:3])
