"""The memserver master: owns the arena, the slabs and the worker processes.

The master never serves NBD itself.  It creates the arena (a locked memfd),
opens the listening sockets, starts one worker process per core and tells
each worker which exports to map.  Control requests (create, delete, list,
health, metrics) arrive over HTTP (:mod:`memserver.control`) and are applied
here, one at a time, to every worker before they are answered, so an export
that was reported created can be opened through any worker.

A worker that dies is restarted with the current export table; its clients
lose their connections (NBD clients reconnect), nothing else is touched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from memserver import __version__
from memserver.admission import ConnectionTable, create_table
from memserver.arena import Arena
from memserver.nbd.server import DEFAULT_MAX_PAYLOAD, Limits
from memserver.session import DEFAULT_HANDSHAKE_TIMEOUT
from memserver.slabs import (
    DEFAULT_SLAB_SIZE,
    SlabAllocator,
    check_slab_size,
    format_size,
    slab_runs,
)
from memserver.stats import MemserverCollector, merge_snapshots
from memserver.worker import WorkerConfig

log = logging.getLogger(__name__)

DEFAULT_NBD_PORT = 10809
DEFAULT_CONTROL_PORT = 10810
# Export sizes are whole pages: every client block size divides them.
EXPORT_GRANULE = 4096
WORKER_CALL_TIMEOUT = 30.0
WORKER_RESTART_DELAY = 1.0


def new_export_name() -> str:
    """An unguessable export name (160 random bits) that is safe anywhere.

    The name is the key to the export's bytes.  Lowercase base32 keeps it
    free of characters that a shell, a URI or an option parser would take
    for something else (a leading "-", "/", "?").
    """
    return base64.b32encode(secrets.token_bytes(20)).decode().lower()


class MemserverError(Exception):
    """A control request that cannot be carried out; the message says why."""


class UnknownExportError(MemserverError):
    """No export of that name exists on this memserver."""


class WorkerError(MemserverError):
    """A worker process failed or did not answer."""


@dataclass(frozen=True)
class MemserverConfig:
    """How a memserver runs; see ``rampool memserver run --help``."""

    size: int
    listen: tuple[str, int] = ("127.0.0.1", DEFAULT_NBD_PORT)
    control: tuple[str, int] = ("127.0.0.1", DEFAULT_CONTROL_PORT)
    unix_socket: str | None = None
    zone: str | None = None
    slab_size: int = DEFAULT_SLAB_SIZE
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    lock: bool = True
    min_block: int = 1
    max_payload: int = DEFAULT_MAX_PAYLOAD
    allow_list: bool = False
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_connections: int = 1024
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        check_slab_size(self.slab_size)
        if self.size < self.slab_size:
            raise ValueError(
                f"--size {format_size(self.size)} is smaller than one slab "
                f"({format_size(self.slab_size)}); give at least one slab"
            )
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        # The workers build the same limits; fail here, with the flag's name.
        try:
            Limits(min_block=self.min_block, max_payload=self.max_payload)
        except ValueError as e:
            raise ValueError(f"--min-block-size: {e}") from None


@dataclass
class ExportRecord:
    """An export as the master knows it."""

    name: str
    size: int
    slabs: list[int]
    label: str
    created: float

    @property
    def short(self) -> str:
        """A prefix of the name for logs: the full name opens the export."""
        return self.name[:8]


class WorkerHandle:
    """The master's end of one worker process."""

    def __init__(
        self,
        index: int,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.index = index
        self.process = process
        self.reader = reader
        self.writer = writer
        self.lock = asyncio.Lock()

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its reply."""
        async with self.lock:
            try:
                self.writer.write(json.dumps(request).encode() + b"\n")
                await self.writer.drain()
                line = await asyncio.wait_for(
                    self.reader.readline(), WORKER_CALL_TIMEOUT
                )
            except (TimeoutError, OSError) as e:
                raise WorkerError(
                    f"worker {self.index} (pid {self.process.pid}) did not answer "
                    f"{request['op']}: {e!r}"
                ) from e
        if not line:
            raise WorkerError(
                f"worker {self.index} (pid {self.process.pid}) exited during "
                f"{request['op']}"
            )
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(
                f"worker {self.index} refused {request['op']}: {reply.get('error')}"
            )
        return reply


class Memserver:
    """A running memserver; ``start`` it, then drive it, then ``stop`` it."""

    def __init__(
        self, config: MemserverConfig, registry: CollectorRegistry | None = None
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.arena: Arena | None = None
        self.allocator = SlabAllocator(
            config.size // config.slab_size, config.slab_size
        )
        self.exports: dict[str, ExportRecord] = {}
        self.workers: list[WorkerHandle | None] = [None] * config.workers
        self.listen_address: tuple[str, int] = config.listen
        self.started = time.time()
        self._sockets: list[socket.socket] = []
        self._connections_fd = create_table(config.workers)
        self.admission = ConnectionTable(
            self._connections_fd, config.workers, config.max_connections
        )
        self._changes = asyncio.Lock()
        self._stopping = False
        self._supervisors: list[asyncio.Task[None]] = []
        self._last_requests = merge_snapshots([])
        self.registry.register(
            MemserverCollector(lambda: self._last_requests, self.pool_gauges)
        )

    # Lifecycle.

    async def start(self) -> None:
        config = self.config
        usable = self.allocator.total_slabs * config.slab_size
        if usable != config.size:
            log.warning(
                "arena size rounded down to whole slabs size=%d usable=%d",
                config.size,
                usable,
            )
        self.arena = Arena.create(usable, lock=config.lock)
        self._sockets = self._open_listeners()
        for index in range(config.workers):
            self.workers[index] = await self._spawn(index)
            self._supervisors.append(asyncio.create_task(self._supervise(index)))

    def _open_listeners(self) -> list[socket.socket]:
        host, port = self.config.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, port))
        except OSError as e:
            tcp.close()
            raise MemserverError(
                f"cannot listen for NBD on {host}:{port}: {e.strerror}; "
                "pick another address with --listen"
            ) from e
        tcp.listen(512)
        tcp.setblocking(False)
        self.listen_address = tcp.getsockname()[:2]
        sockets = [tcp]
        path = self.config.unix_socket
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                unix.bind(path)
            except OSError as e:
                unix.close()
                tcp.close()
                raise MemserverError(f"cannot listen on {path}: {e.strerror}") from e
            unix.listen(512)
            unix.setblocking(False)
            sockets.append(unix)
        return sockets

    async def _spawn(self, index: int) -> WorkerHandle:
        assert self.arena is not None
        config = self.config
        ours, theirs = socket.socketpair()
        listen_fds = [s.fileno() for s in self._sockets]
        worker_config = WorkerConfig(
            index=index,
            arena_fd=self.arena.fd,
            control_fd=theirs.fileno(),
            listen_fds=listen_fds,
            lock=config.lock,
            min_block=config.min_block,
            max_payload=config.max_payload,
            allow_list=config.allow_list,
            handshake_timeout=config.handshake_timeout,
            connections_fd=self._connections_fd,
            workers=config.workers,
            max_connections=config.max_connections,
            log_level=config.log_level,
        )
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                # -P: import the installed memserver, never a directory of the
                # same name that the daemon happens to be started from.
                "-P",
                "-m",
                "memserver.worker",
                worker_config.to_json(),
                pass_fds=[
                    self.arena.fd,
                    self._connections_fd,
                    theirs.fileno(),
                    *listen_fds,
                ],
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        handle = WorkerHandle(index, process, reader, writer)
        for record in self.exports.values():
            await handle.call(self._add_request(record))
        await handle.call({"op": "start"})
        log.info("worker started index=%d pid=%d", index, process.pid)
        return handle

    async def _supervise(self, index: int) -> None:
        while not self._stopping:
            handle = self.workers[index]
            assert handle is not None
            code = await handle.process.wait()
            if self._stopping:
                return
            self.workers[index] = None
            handle.writer.close()
            log.error(
                "worker exited index=%d pid=%d code=%s; its clients were "
                "disconnected, restarting it",
                index,
                handle.process.pid,
                code,
            )
            self.admission.reset(index)
            await asyncio.sleep(WORKER_RESTART_DELAY)
            async with self._changes:
                try:
                    self.workers[index] = await self._spawn(index)
                except (MemserverError, OSError) as e:
                    log.error("worker restart failed index=%d error=%s", index, e)
                    return

    async def stop(self) -> None:
        """Close every connection, stop the workers, release the arena."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        for handle in self.workers:
            if handle is None:
                continue
            try:
                await handle.call({"op": "stop"})
            except WorkerError as e:
                log.warning("worker did not stop cleanly: %s", e)
            try:
                await asyncio.wait_for(handle.process.wait(), 10)
            except TimeoutError:
                log.warning("killing worker pid=%d", handle.process.pid)
                handle.process.kill()
                await handle.process.wait()
            handle.writer.close()
        for sock in self._sockets:
            sock.close()
        if self.config.unix_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.unix_socket)
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        os.close(self._connections_fd)

    # Exports.

    async def create_export(self, size: int, label: str = "") -> ExportRecord:
        """Allocate slabs for ``size`` bytes and serve them under a new name.

        Raises ``ValueError`` for a bad size and
        :class:`~memserver.slabs.PoolExhaustedError` when the arena is short.
        """
        if size <= 0 or size % EXPORT_GRANULE:
            raise ValueError(
                f"export size must be a positive multiple of {EXPORT_GRANULE} "
                f"bytes, got {size}"
            )
        async with self._changes:
            self._check_running()
            slabs = self.allocator.allocate(math.ceil(size / self.config.slab_size))
            record = ExportRecord(
                name=new_export_name(),
                size=size,
                slabs=slabs,
                label=label,
                created=time.time(),
            )
            try:
                await self._tell_workers(self._add_request(record))
            except MemserverError:
                await self._tell_workers({"op": "remove", "name": record.name})
                await self._wipe_and_free(record)
                raise
            self.exports[record.name] = record
        log.info(
            "export created export=%s label=%s size=%d slabs=%d free_slabs=%d",
            record.short,
            label,
            size,
            len(slabs),
            self.allocator.free_slabs,
        )
        return record

    async def delete_export(self, name: str) -> ExportRecord:
        """Disconnect the export's clients, wipe its slabs and free them."""
        async with self._changes:
            self._check_running()
            record = self.exports.get(name)
            if record is None:
                raise UnknownExportError("no export of that name on this memserver")
            replies = await self._tell_workers({"op": "remove", "name": name})
            del self.exports[name]
            await self._wipe_and_free(record)
        log.info(
            "export deleted export=%s label=%s clients_closed=%d free_slabs=%d",
            record.short,
            record.label,
            sum(reply.get("closed", 0) for reply in replies),
            self.allocator.free_slabs,
        )
        return record

    def _check_running(self) -> None:
        if self._stopping or self.arena is None:
            raise MemserverError("the memserver is shutting down")

    def _add_request(self, record: ExportRecord) -> dict[str, Any]:
        return {
            "op": "add",
            "name": record.name,
            "size": record.size,
            "description": record.label,
            "runs": slab_runs(record.slabs, self.config.slab_size),
        }

    async def _tell_workers(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        handles = [h for h in self.workers if h is not None]
        results = await asyncio.gather(
            *(h.call(request) for h in handles), return_exceptions=True
        )
        replies = []
        for result in results:
            if isinstance(result, BaseException):
                if isinstance(result, WorkerError):
                    raise result
                raise WorkerError(f"worker call failed: {result!r}") from result
            replies.append(result)
        return replies

    async def _wipe_and_free(self, record: ExportRecord) -> None:
        # No tenant may ever read another's bytes: zero before reuse.  memset
        # runs in a thread (cffi drops the GIL) so large wipes do not stall
        # the control API.
        arena = self.arena
        assert arena is not None
        loop = asyncio.get_running_loop()
        for offset, length in slab_runs(record.slabs, self.config.slab_size):
            await loop.run_in_executor(None, arena.zero, offset, length)
        self.allocator.free(record.slabs)

    # Observation.

    def nbd_uri(self, name: str) -> str:
        host, port = self.listen_address
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"nbd://{host}:{port}/{name}"

    def pool_gauges(self) -> dict[str, int]:
        allocator = self.allocator
        return {
            "slab_size": self.config.slab_size,
            "slabs_used": allocator.used_slabs,
            "slabs_free": allocator.free_slabs,
            "slabs_total": allocator.total_slabs,
            "exports": len(self.exports),
            "arena_bytes": self.arena.size if self.arena else 0,
            "arena_locked": int(bool(self.arena and self.arena.locked)),
            "workers": sum(
                1
                for h in self.workers
                if h is not None and h.process.returncode is None
            ),
        }

    async def gather_stats(self) -> dict[str, Any]:
        """Ask every worker for its counters and keep the sum for /metrics."""
        handles = [h for h in self.workers if h is not None]
        results = await asyncio.gather(
            *(h.call({"op": "stats"}) for h in handles), return_exceptions=True
        )
        snapshots = [r["stats"] for r in results if isinstance(r, dict)]
        self._last_requests = merge_snapshots(snapshots)
        return self._last_requests

    def health(self) -> dict[str, Any]:
        gauges = self.pool_gauges()
        healthy = (
            not self._stopping
            and self.arena is not None
            and gauges["workers"] == self.config.workers
        )
        return {
            "status": "ok" if healthy else "degraded",
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "zone": self.config.zone,
            "nbd": "{}:{}".format(*self.listen_address),
            "unix_socket": self.config.unix_socket,
            "arena": {
                "bytes": gauges["arena_bytes"],
                "locked": bool(gauges["arena_locked"]),
                "huge_pages": self.arena.huge_pages if self.arena else None,
            },
            "slabs": {
                "size": gauges["slab_size"],
                "total": gauges["slabs_total"],
                "used": gauges["slabs_used"],
                "free": gauges["slabs_free"],
            },
            "free_bytes": gauges["slabs_free"] * gauges["slab_size"],
            "exports": gauges["exports"],
            "workers": {"running": gauges["workers"], "wanted": self.config.workers},
        }

    def describe(self, record: ExportRecord) -> dict[str, Any]:
        return {
            "name": record.name,
            "size": record.size,
            "label": record.label,
            "slabs": len(record.slabs),
            "allocated_bytes": len(record.slabs) * self.config.slab_size,
            "created": record.created,
            "uri": self.nbd_uri(record.name),
        }
