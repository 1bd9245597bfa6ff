"""A real memserver daemon in a child process, for tests and benchmarks.

``MemserverProcess`` runs ``rampool memserver run`` exactly as an operator
would, on ports the kernel picks, waits for its "ready" line, and talks to its
control API over HTTP.  Clients we did not write (nbdinfo, nbdsh, qemu-io,
fio...) get the NBD URIs it returns.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
READY = re.compile(
    r"memserver ready nbd=(?P<nbd>\S+) unix=(?P<unix>\S+) control=(?P<control>\S+)"
)


def client_env() -> dict[str, str]:
    """Environment for external clients: the venv's python3 first on PATH.

    nbdsh runs ``python3`` from PATH and needs Debian's libnbd module, which
    the venv (made with --system-site-packages) can import.
    """
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


class MemserverProcess:
    """``rampool memserver run`` as a child process."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        size: str = "256M",
        workers: int = 2,
        extra: list[str] | None = None,
    ) -> None:
        self.socket_path = str(tmp_path / "nbd.sock")
        self.argv = [
            str(VENV_BIN / "rampool"),
            "memserver",
            "run",
            "--size",
            size,
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--socket",
            self.socket_path,
            "--workers",
            str(workers),
            *(extra or []),
        ]
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self.nbd_address = ""
        self.control_url = ""
        self._ready = threading.Event()

    # Lifecycle.

    def start(self, timeout: float = 30.0) -> MemserverProcess:
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(),
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._ready.wait(timeout):
            self.kill()
            raise AssertionError(f"memserver not ready in {timeout}s:\n{self.log}")
        if self.process.poll() is not None:
            raise AssertionError(f"memserver exited at start:\n{self.log}")
        return self

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.nbd_address = match["nbd"]
                self.control_url = match["control"]
                self._ready.set()
        self._ready.set()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait, and return the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"memserver ignored SIGTERM:\n{self.log}") from None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait until a log line matches ``pattern``; return that line."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matched {pattern!r}:\n{self.log}")

    # Control API.

    def request(
        self, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        """Call the control API; return (status, decoded JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.control_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                status, raw = response.status, response.read()
                ctype = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
            ctype = e.headers.get("Content-Type", "")
        if "json" in ctype:
            return status, json.loads(raw)
        return status, raw.decode()

    def create_export(self, size: int | str, label: str = "") -> dict[str, Any]:
        status, body = self.request("POST", "/v1/exports", {"size": size, "label": label})
        assert status == 201, (status, body)
        return dict(body)

    def delete_export(self, name: str) -> None:
        status, body = self.request("DELETE", f"/v1/exports/{name}")
        assert status == 204, (status, body)

    def metrics(self) -> str:
        status, body = self.request("GET", "/metrics")
        assert status == 200, (status, body)
        return str(body)

    def unix_uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket_path}"
