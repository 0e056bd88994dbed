"""Secure defaults: checkpoints never unpickle code; tracking URIs with credentials work and are never shown
with them; the Ray that mocolab starts itself serves no web dashboard (its headless dashboard process binds
127.0.0.1) and keeps token authentication on."""

from __future__ import annotations

import http.server
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mocolab import tracking
from mocolab.config import ConfigError
from mocolab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint


class _RunsCodeWhenUnpickled:
    """A pickled object that would create ``marker`` when loaded with plain pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    save_checkpoint(tmp_path, {"model": {"w": torch.zeros(2)}, "epoch": 1})
    malicious = {"model": {"w": torch.zeros(2)}, "epoch": 2, "payload": _RunsCodeWhenUnpickled(marker)}
    torch.save(malicious, tmp_path / CHECKPOINT_FILE)  # what a tampered checkpoint in shared storage could hold

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(tmp_path)
    assert not marker.exists()
    torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)  # the control: plain pickle runs the payload
    assert marker.exists()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_tracking_uri_with_credentials_is_probed_and_reported_without_them(monkeypatch):
    monkeypatch.setenv("MYSERVICE_API_KEY", "fake-key-0a1b2c")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_reachable(f"http://alice:s3cret-pw@127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConfigError) as err:
        tracking.check_reachable(f"http://alice:s3cret-pw@127.0.0.1:{server.server_address[1]}")
    assert "http://***@127.0.0.1" in str(err.value) and "s3cret-pw" not in str(err.value)
    config = {"tracking": {"tracking_uri": "https://bob:pw-123@mlflow.example"}, "data": {"root": "/d/fake-key-0a1b2c"}}
    assert tracking.redact_tree(config) == {
        "tracking": {"tracking_uri": "https://***@mlflow.example"},
        "data": {"root": "/d/***"},
    }


_PROBE = """
import json, psutil, ray
from mocolab.runtime import ensure_ray
ensure_ray()
from ray._private import ray_constants
from ray._raylet import AuthenticationMode, get_authentication_mode
node = ray._private.worker._global_node
dashboards = [psutil.Process(p.process.pid) for p in node.all_processes.get(ray_constants.PROCESS_TYPE_DASHBOARD, [])]
print("PROBE" + json.dumps({
    "dashboard_url": ray._private.worker.get_dashboard_url(),
    "dashboard_hosts": sorted({a for d in dashboards for a in d.cmdline() if a.startswith("--host=")}),
    "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN,
}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_started_by_mocolab_has_no_dashboard_and_token_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no cluster to join
    env.update(RAY_USAGE_STATS_ENABLED="0", HOME=str(tmp_path))  # HOME: its own ~/.ray/auth_token
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(next(line[5:] for line in out.stdout.splitlines() if line.startswith("PROBE")))
    assert probe["dashboard_url"] == ""  # no web dashboard
    assert probe["dashboard_hosts"] in ([], ["--host=127.0.0.1"])  # its headless HTTP side binds loopback only
    # Ray's internal gRPC servers (GCS, raylet, the headless dashboard's gRPC port) listen on every interface
    # whatever the dashboard host; token authentication, checked next, is what guards them.
    assert probe["token_auth"] is True
    assert (tmp_path / ".ray" / "auth_token").is_file()
