"""``mocolab.runtime`` without Ray: the local head's GCS port."""

from __future__ import annotations

from types import SimpleNamespace

from mocolab import runtime


class _Socket:
    """A socket whose ``bind(("127.0.0.1", 0))`` gets the next port of ``ports``."""

    def __init__(self, ports):
        self.ports = ports

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, address):
        self.port = next(self.ports)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_the_gcs_port_is_never_one_ray_takes_by_default(monkeypatch):
    ports = iter([52365, 8265, 6379, 10001, 41234])
    # runtime's own name for the socket module only: Ray threads of this process keep the real sockets
    monkeypatch.setattr(runtime, "socket", SimpleNamespace(socket=lambda: _Socket(ports)))
    assert runtime._free_port() == 41234


def test_the_gcs_port_is_a_port_the_os_gave():
    port = runtime._free_port()
    assert 0 < port < 65536 and port not in runtime.RAY_FIXED_PORTS
