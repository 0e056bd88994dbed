"""On a cluster the pre-flight step checks the data where the workers read it (issue 20, item 1).

A real Ray cluster on this machine: a head with no CPU (no worker can run there), then worker nodes of one CPU.
The driver (a separate process with ``RAY_ADDRESS``, as under ``ray job submit``) runs the pre-flight step of a
pretraining config whose ``data.root`` is a local folder. A worker node started in a mount namespace of its own
with an empty filesystem over that folder is a node where the NFS share was never mounted: the driver sees the
data, that node does not, and the run is refused before any MLflow run or Ray Train worker exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from local_cluster import local_cluster

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[3] / "shared/data/cifar10-subset"
PREFLIGHT = """
import sys
from mocolab.config import ConfigError, load_config
from mocolab.preflight import preflight
try:
    preflight(load_config(sys.argv[1]))
except ConfigError as err:
    print("REFUSED", err)
    sys.exit(2)
"""
"""A driver's pre-flight step; a refusal is its one line after ``REFUSED``."""


def small_imagefolder(root: Path) -> Path:
    for split, n in (("train", 4), ("test", 2)):
        for class_dir in sorted((SHARED / split).iterdir())[:3]:
            (root / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:n]:
                shutil.copy(image, root / split / class_dir.name / image.name)
    return root


def run_preflight(cluster, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PREFLIGHT, str(config)], env={**cluster.env, "RAY_ADDRESS": cluster.address},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_data_is_checked_on_every_worker_node(tmp_path):
    data = small_imagefolder(tmp_path / "nfs" / "cifar")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "imagefolder", "root": str(data), "image_size": 16, "loader_workers": 0},
        "moco": {"queue_size": 16}, "model": {"arch": "small_cnn", "bn": "shuffle"},
        "train": {"batch_size": 4, "knn_every": 0}, "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "rr")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }))  # fmt: skip
    with local_cluster() as cluster:
        cluster.add_node(num_cpus=0, resources={})
        alone = run_preflight(cluster, config)
        assert alone.returncode == 0, alone.stdout + alone.stderr
        assert "no worker node is up yet" in alone.stdout  # said once, not silently skipped

        cluster.add_node(num_cpus=1, resources={})
        both = run_preflight(cluster, config)
        assert both.returncode == 0, both.stdout + both.stderr
        assert "pre-flight checks passed (12 training images)" in both.stdout
        assert "no worker node is up yet" not in both.stdout

        hide = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none {tmp_path / "nfs"} && exec "$@"', "--"]
        cluster.add_node(num_cpus=1, resources={}, wrap=hide)  # a node without the share
        refused = run_preflight(cluster, config)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = [line for line in refused.stdout.splitlines() if line.startswith("REFUSED")]
    assert re.match(rf"REFUSED worker node [\d.]+:\d+: data.root={data}\b", line), line
    assert "mount the same storage at the same path on every node" in line
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was created
