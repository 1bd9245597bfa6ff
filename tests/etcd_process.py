"""A real etcd server in a child process, for the registry's tests.

``EtcdProcess(tmp_path).start()`` runs Debian's ``etcd`` as a one-member
cluster on loopback ports the kernel picked, with its data and its log in
``tmp_path``, and returns once etcd reports itself healthy::

    with EtcdProcess(tmp_path) as etcd:
        registry = open_registry(etcd.url + "/test")

A missing ``etcd`` binary fails the test: scripts/test.sh installs it.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import pytest

HEALTH_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

# Two etcd processes, or another test's server, may take a port between our
# probe and etcd's bind; then etcd exits at once and start() tries new ports.
_START_ATTEMPTS = 3


# Loopback only: never through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EtcdProcess:
    """One etcd member listening on 127.0.0.1, data in ``tmp_path``."""

    def __init__(self, tmp_path: Path, *, name: str = "rampool-test") -> None:
        self.tmp_path = Path(tmp_path)
        self.name = name
        self.data_dir = self.tmp_path / "etcd-data"
        self.log_path = self.tmp_path / "etcd.log"
        self.client_port = 0
        self.peer_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The registry URL of this etcd, without a prefix."""
        return f"etcd://127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(etcd wrote no log)"

    def start(self) -> EtcdProcess:
        """Run etcd and wait until /health answers true; fail loudly if not."""
        binary = shutil.which("etcd") or shutil.which("etcd", path="/usr/bin")
        if binary is None:
            pytest.fail(
                "etcd is not installed: run scripts/test.sh, which installs "
                "Debian's etcd-server",
                pytrace=False,
            )
        for _ in range(_START_ATTEMPTS):
            self._spawn(binary)
            if self._wait_healthy():
                return self
            if not self._lost_port_race():
                break
        log = self.log
        self.kill()
        raise AssertionError(
            f"etcd on 127.0.0.1:{self.client_port} did not become healthy "
            f"within {HEALTH_TIMEOUT:.0f} s; its log:\n{log[-6000:]}"
        )

    def _spawn(self, binary: str) -> None:
        self.client_port = free_port()
        self.peer_port = free_port()
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"{self.name}={peer_url}",
            "--initial-cluster-state",
            "new",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        shutil.rmtree(self.data_dir, ignore_errors=True)
        # A file, not a pipe: nobody reads etcd's output while the test
        # runs, and a full pipe would stall it.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _wait_healthy(self) -> bool:
        """True once /health says true; False if etcd exits or time runs out."""
        assert self.process is not None
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with _DIRECT.open(self.client_url + "/health", timeout=2) as response:
                    if json.loads(response.read()).get("health") == "true":
                        return True
            except (OSError, ValueError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        return False

    def _lost_port_race(self) -> bool:
        assert self.process is not None
        exited = self.process.poll() is not None
        return exited and "address already in use" in self.log

    def stop(self) -> int:
        """SIGTERM, wait, SIGKILL if it lingers; return the exit status.

        etcd ends by re-raising the SIGTERM once it has shut down, so a clean
        stop returns -15 (-9 means it had to be killed).
        """
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EtcdProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
