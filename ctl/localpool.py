"""Memservers run as child processes of this one, on loopback.

Used by ``rampool demo`` (and by the test suite) to stand up a pool on one
host exactly as an operator would: the real ``rampool memserver run``
command, on ports the kernel picks, reached through its control API.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ctl.memserver_client import MemserverClient

READY = re.compile(
    r"memserver ready nbd=(?P<nbd>\S+) unix=(?P<unix>\S+) control=(?P<control>\S+)"
)


class LocalMemserverError(Exception):
    """A local memserver would not start or stop; the message has its log."""


class LocalMemserver:
    """One ``rampool memserver run`` child process.

    ``extra`` adds command-line flags; ``wrapper`` runs the daemon under
    another command (``setpriv``, ``prlimit``); ``env`` is its environment.
    """

    def __init__(
        self,
        *,
        size: str = "256M",
        workers: int = 2,
        socket_path: str | None = None,
        extra: list[str] | None = None,
        wrapper: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.socket_path = socket_path
        rampool = Path(sys.executable).parent / "rampool"
        self.argv = [
            *(wrapper or []),
            str(rampool),
            "memserver",
            "run",
            "--size",
            size,
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--workers",
            str(workers),
            *(["--socket", socket_path] if socket_path else []),
            *(extra or []),
        ]
        self.env = env
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self.nbd_address = ""
        self.control_url = ""
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def client(self) -> MemserverClient:
        return MemserverClient(self.control_url)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def start(self, timeout: float = 30.0) -> LocalMemserver:
        """Start the daemon and wait for its "ready" line."""
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self.control_url:
            self.kill()
            raise LocalMemserverError(
                f"memserver did not become ready in {timeout:.0f}s:\n{self.log}"
            )
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
        self._ready.set()  # exited: stop waiting

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait, and return the exit status; ``log`` is then whole."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LocalMemserverError(
                f"memserver ignored SIGTERM for {timeout:.0f}s:\n{self.log}"
            ) from None
        self._join_reader()
        return status

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._join_reader()

    def _join_reader(self) -> None:
        # The exit can come before the last log lines are read.  A worker
        # that outlived the master would hold the pipe open: do not hang.
        if self._reader is not None:
            self._reader.join(5.0)

    def unix_uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket_path}"
