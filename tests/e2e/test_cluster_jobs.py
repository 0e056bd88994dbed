"""`ray job submit` against the session's job cluster (conftest ``job_cluster``: a Ray head with the job server on
127.0.0.1 and token auth, two worker nodes): the job server refuses requests without the token, and a job runs the
checkout's code shipped with it (``py_modules``), not a copy installed on the nodes. The README's pretraining, linear
eval and sweep jobs themselves run in test_cluster_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from local_servers import VENV_BIN

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV_EXCLUDES = [".git", ".venv", "*.db", "mlruns", "ray_results", "reports", "__pycache__"]


def test_job_server_refuses_requests_without_the_token(job_cluster):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{job_cluster.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)
    auth = {"Authorization": f"Bearer {job_cluster.token.read_text()}"}
    with urllib.request.urlopen(urllib.request.Request(f"{job_cluster.dashboard_url}/api/jobs/", headers=auth),
                                timeout=10) as resp:  # fmt: skip
        assert resp.status == 200


def test_job_runs_the_uploaded_checkout_not_the_installed_copy(job_cluster):
    runtime_env = {"py_modules": ["platform/mocolab"], "excludes": RUNTIME_ENV_EXCLUDES}
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", job_cluster.dashboard_url, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-c", "import mocolab; print('MOCOLAB_AT', mocolab.__file__)"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=job_cluster.env, capture_output=True, text=True, timeout=300)
    logs = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in logs, logs[-4000:]
    (line,) = [line for line in logs.splitlines() if line.startswith("MOCOLAB_AT")]
    location = Path(line.split(maxsplit=1)[1])
    assert not location.is_relative_to(REPO)  # py_modules: Ray's copy of platform/mocolab
    assert location.parent.name == "mocolab" and "runtime_resources" in location.parts
