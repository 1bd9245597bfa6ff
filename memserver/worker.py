"""A memserver worker process: serves NBD connections on the shared ports.

The master starts ``python -m memserver.worker CONFIG_JSON`` with the arena's
memfd, the listening sockets and one end of a control socket pair passed as
open file descriptors.  Workers accept from the same listening sockets, so
the kernel spreads connections over them and the memserver uses every core.

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

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

from memserver import arena, libc
from memserver.nbd.server import ExportInfo, Limits
from memserver.stats import RequestStats
from memserver.transport import NBDProtocol, ServedExport, WorkerContext

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


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
    max_connections: int
    log_level: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))


class Worker:
    """The state of one worker process and its control loop."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.context = WorkerContext(
            exports={},
            stats=RequestStats(),
            limits=Limits(
                min_block=config.min_block,
                max_payload=config.max_payload,
                allow_list=config.allow_list,
            ),
            handshake_timeout=config.handshake_timeout,
            max_connections=config.max_connections,
        )
        self.servers: list[asyncio.Server] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        control = socket.socket(fileno=self.config.control_fd)
        reader, writer = await asyncio.open_unix_connection(sock=control, limit=2**20)
        channel = asyncio.create_task(self._serve_control(reader, writer))
        stop_wait = asyncio.create_task(stopping.wait())
        await asyncio.wait({channel, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        channel.cancel()
        await self._stop()
        writer.close()

    async def _serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            line = await reader.readline()
            if not line:
                log.info("master went away, worker=%d exiting", self.config.index)
                return
            request = json.loads(line)
            try:
                reply = await self._handle(request)
            except Exception as e:  # reported to the master, which decides
                log.exception("control request failed op=%s", request.get("op"))
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            if request.get("op") == "stop":
                return

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        context = self.context
        if op == "add":
            name = request["name"]
            runs = [(int(off), int(length)) for off, length in request["runs"]]
            mapping = arena.ExportMapping(
                self.config.arena_fd, runs, lock=self.config.lock
            )
            info = ExportInfo(
                name, int(request["size"]), request.get("description", "")
            )
            context.exports[name] = ServedExport(info, mapping)
            return {"ok": True}
        if op == "remove":
            served = context.exports.pop(request["name"], None)
            if served is None:
                return {"ok": True, "closed": 0}
            clients = list(served.connections)
            for protocol in clients:
                protocol.detach()
            served.connections.clear()
            served.mapping.close()
            return {"ok": True, "closed": len(clients)}
        if op == "start":
            loop = asyncio.get_running_loop()
            for fd in self.config.listen_fds:
                sock = socket.socket(fileno=fd)
                server = await loop.create_server(
                    lambda: NBDProtocol(context), sock=sock
                )
                self.servers.append(server)
            return {"ok": True}
        if op == "stats":
            return {"ok": True, "stats": context.stats.snapshot()}
        if op == "stop":
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def _stop(self) -> None:
        self.context.shutting_down = True
        for server in self.servers:
            server.close()
        for protocol in list(self.context.connections):
            if protocol.transport is not None:
                protocol.transport.close()
        # Give queued replies a moment to drain before the mappings go.
        await asyncio.sleep(0.05)
        for protocol in list(self.context.connections):
            protocol.detach()
        await asyncio.sleep(0)
        for served in self.context.exports.values():
            served.mapping.close()
        self.context.exports.clear()


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
    # decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        sys.exit("memserver worker: the master is already gone")
    asyncio.run(Worker(config).run())


if __name__ == "__main__":
    main()
