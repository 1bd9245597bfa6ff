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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ctl.localpool import LocalMemserver

VENV_BIN = Path(sys.executable).parent


def client_env() -> dict[str, str]:
    """Environment for external clients: the venv's python3 first on PATH.

    nbdsh runs ``python3`` from PATH and needs Debian's libnbd module, which
    the venv (made with --system-site-packages) can import.
    """
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


class MemserverProcess(LocalMemserver):
    """``rampool memserver run`` as a child process, with a unix socket in
    ``tmp_path`` and test-friendly accessors."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        size: str = "256M",
        workers: int = 2,
        extra: list[str] | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        # ``wrapper`` runs the daemon under another command (setpriv, prlimit).
        super().__init__(
            size=size,
            workers=workers,
            socket_path=str(tmp_path / "nbd.sock"),
            extra=extra,
            wrapper=wrapper,
            env=client_env(),
        )

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
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """Call the control API; return (status, decoded JSON or text).

        ``body`` is sent as JSON; ``raw`` is sent as it is (malformed bodies).
        """
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        status, ctype, reply = self.client.exchange(method, path, data)
        if "json" in ctype:
            return status, json.loads(reply)
        return status, reply.decode()

    def create_export(self, size: int | str, label: str = "") -> dict[str, Any]:
        status, body = self.request(
            "POST", "/v1/exports", {"size": size, "label": label}
        )
        assert status == 201, (status, body)
        return dict(body)

    def delete_export(self, name: str) -> None:
        status, body = self.request("DELETE", f"/v1/exports/{name}")
        assert status == 204, (status, body)

    def metrics(self) -> str:
        status, body = self.request("GET", "/metrics")
        assert status == 200, (status, body)
        return str(body)

    def worker_pids(self) -> list[int]:
        """Pids of this daemon's live worker processes, read from /proc."""
        assert self.process is not None
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # exited while we looked
                continue
            # The command name may hold spaces or ")": fields resume after
            # the last ")", with the state first and the parent's pid second.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.process.pid and b"memserver.worker" in cmdline:
                pids.append(int(entry.name))
        return sorted(pids)


def run_tool(
    argv: list[str], *, timeout: float = 60.0, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run an external client with :func:`client_env`; fail with its output.

    A non-zero exit becomes an AssertionError that shows stdout and stderr.
    """
    try:
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            env=client_env(),
            timeout=timeout,
            check=True,
        )
    except subprocess.CalledProcessError as e:
        raise AssertionError(
            f"{' '.join(argv)} exited with {e.returncode}\n"
            f"stdout:\n{e.stdout.decode(errors='replace')[-4000:]}\n"
            f"stderr:\n{e.stderr.decode(errors='replace')[-4000:]}"
        ) from None


def nbdsh(
    uri: str,
    script: str,
    *,
    structured: bool = True,
    stdin: bytes | None = None,
    timeout: float = 60.0,
) -> bytes:
    """Run ``script`` in nbdsh with ``h`` connected to ``uri``; return stdout.

    ``structured=False`` connects without structured replies.  An exception
    in the script fails the caller with nbdsh's traceback.
    """
    argv = ["nbdsh"]
    if not structured:
        argv += ["-c", "h.set_request_structured_replies(False)"]
    argv += ["-c", f"h.connect_uri({uri!r})", "-c", script]
    return run_tool(argv, stdin=stdin, timeout=timeout).stdout


_READ_ALL = """
import sys
size = h.get_size()
step = 4 << 20
for offset in range(0, size, step):
    sys.stdout.buffer.write(h.pread(min(step, size - offset), offset))
"""

_WRITE_STDIN = """
import sys
data = sys.stdin.buffer.read()
step = 4 << 20
for i in range(0, len(data), step):
    h.pwrite(data[i : i + step], {offset} + i)
"""


def read_export(uri: str) -> bytes:
    """Every byte of the export at ``uri``, read through nbdsh."""
    return nbdsh(uri, _READ_ALL)


def write_export(uri: str, data: bytes, offset: int = 0) -> None:
    """Write ``data`` at ``offset`` of the export at ``uri`` through nbdsh."""
    nbdsh(uri, _WRITE_STDIN.format(offset=offset), stdin=data)


def first_difference(actual: bytes, expected: bytes) -> int | None:
    """Offset of the first byte that differs (or of the shorter end), or None.

    Large buffers compare without pytest's diff, which would not end.
    """
    if actual == expected:
        return None
    for offset, (a, b) in enumerate(zip(actual, expected, strict=False)):
        if a != b:
            return offset
    return min(len(actual), len(expected))
