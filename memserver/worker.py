"""A memserver worker process: serves NBD connections on the shared ports.

The master starts ``python -m memserver.worker CONFIG_JSON`` with the arena's
memfd, the listening sockets and one end of a control socket pair passed as
open file descriptors.  Workers accept from the same listening sockets, so
the kernel spreads connections over them and the memserver uses every core.
Inside a worker each connection has its own thread (:mod:`memserver.session`).

The control channel carries one JSON object per line each way, a request
and then its reply.  Requests (``op``):

``add``     map an export (``name``, ``size``, ``description``, ``runs``)
``remove``  cut off an export's clients and unmap it (``name``)
``start``   begin accepting connections (sent once every export is added)
``stats``   return the request counters
``stop``    stop accepting, close every connection, exit

Workers never allocate or free slabs: the master owns the arena's layout and
only tells workers what to map.  If the master dies, the control channel
closes (and the kernel sends SIGTERM, see PR_SET_PDEATHSIG) and the worker
exits: no orphan keeps serving memory nobody manages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

from memserver import arena, libc
from memserver.admission import ConnectionTable
from memserver.nbd.server import ExportInfo, Limits
from memserver.session import ServedExport, Session, WorkerContext

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# How long a session may take to notice it was shut down before the worker
# gives up waiting; its thread is then stuck in Python, not in a system call.
SESSION_EXIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, passed by the master as JSON."""

    index: int
    arena_fd: int
    control_fd: int
    listen_fds: list[int]
    lock: bool
    min_block: int
    max_payload: int
    allow_list: bool
    handshake_timeout: float
    connections_fd: int
    workers: int
    max_connections: int
    log_level: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))


class Worker:
    """The state of one worker process: its exports, listeners and sessions."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.context = WorkerContext(
            exports={},
            limits=Limits(
                min_block=config.min_block,
                max_payload=config.max_payload,
                allow_list=config.allow_list,
            ),
            admission=ConnectionTable(
                config.connections_fd, config.workers, config.max_connections
            ),
            index=config.index,
            handshake_timeout=config.handshake_timeout,
        )
        self.listeners = [socket.socket(fileno=fd) for fd in config.listen_fds]
        # Writing a byte here wakes the accept loop so that it can stop.
        self._wake_read, self._wake_write = socket.socketpair()
        self._acceptor: threading.Thread | None = None

    def serve_control(self) -> None:
        """Answer the master until it says stop or goes away."""
        with socket.socket(fileno=self.config.control_fd) as control:
            stream = control.makefile("rwb", buffering=0)
            for line in stream:
                request = json.loads(line)
                try:
                    reply = self.handle(request)
                except Exception as e:  # reported to the master, which decides
                    log.exception("control request failed op=%s", request.get("op"))
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                if request.get("op") == "stop":
                    self.stop()
                stream.write(json.dumps(reply).encode() + b"\n")
                if request.get("op") == "stop":
                    return
        log.info("master went away, worker=%d exiting", self.config.index)
        self.stop()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "add":
            return self._add(request)
        if op == "remove":
            return {"ok": True, "closed": self._remove(request["name"])}
        if op == "start":
            self._acceptor = threading.Thread(
                target=self._accept_loop, name="accept", daemon=True
            )
            self._acceptor.start()
            return {"ok": True}
        if op == "stats":
            return {"ok": True, "stats": self.context.snapshot()}
        if op == "stop":
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _add(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request["name"]
        runs = [(int(off), int(length)) for off, length in request["runs"]]
        mapping = arena.ExportMapping(self.config.arena_fd, runs, lock=self.config.lock)
        info = ExportInfo(name, int(request["size"]), request.get("description", ""))
        with self.context.lock:
            self.context.exports[name] = ServedExport(info, mapping)
        return {"ok": True}

    def _remove(self, name: str) -> int:
        context = self.context
        with context.lock:
            served = context.exports.pop(name, None)
            if served is None:
                return 0
            sessions = list(served.sessions)
        self._end_sessions(sessions)
        served.mapping.close()
        return len(sessions)

    def _end_sessions(self, sessions: list[Session]) -> None:
        """Shut the sessions' sockets and wait until no thread uses the memory."""
        for session in sessions:
            session.shut_down()
        for session in sessions:
            session.thread.join(SESSION_EXIT_TIMEOUT)
            if session.thread.is_alive():
                # Unmapping now could crash the process under that thread.
                raise RuntimeError(
                    f"session {session.peer} did not end; export kept mapped"
                )

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            for listener in self.listeners:
                listener.setblocking(False)
                selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self.context.shutting_down:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_read:
                        return
                    if isinstance(key.fileobj, socket.socket):
                        self._accept(key.fileobj)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except BlockingIOError:
            return  # another worker took it
        except OSError as e:
            log.warning("accept failed error=%s", e)
            return
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{address[0]}:{address[1]}"
        else:
            peer = "unix"
        session = self.context.admit(sock, peer)
        if session is None:
            sock.close()
            return
        session.start()

    def stop(self) -> None:
        """Stop accepting, end every session, unmap every export."""
        context = self.context
        with context.lock:
            context.shutting_down = True
            sessions = list(context.sessions)
        self._wake_write.send(b"x")
        if self._acceptor is not None:
            self._acceptor.join()
        for listener in self.listeners:
            listener.close()
        try:
            self._end_sessions(sessions)
        except RuntimeError as e:
            log.error("%s", e)
            return
        with context.lock:
            exports = list(context.exports.values())
            context.exports.clear()
        for served in exports:
            with contextlib.suppress(arena.ArenaError):
                served.mapping.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    config = WorkerConfig.from_json(args[0])
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[worker {config.index}]: "
        "%(message)s",
        stream=sys.stderr,
    )
    # Ctrl-C in a terminal reaches the whole process group; the master
    # decides when workers stop.  SIGTERM comes from the kernel if the master
    # dies (PR_SET_PDEATHSIG), and from operators: both end the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        sys.exit("memserver worker: the master is already gone")
    worker = Worker(config)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker.serve_control()


if __name__ == "__main__":
    main()
