"""The memserver's HTTP/JSON control API (aiohttp).

==========  ======================  ==========================================
method      path                    does
==========  ======================  ==========================================
GET         /v1/health              state of the arena, slabs and workers
GET         /v1/exports             every export (name, size, label, NBD URI)
POST        /v1/exports             create: ``{"size": 67108864 | "64M",
                                    "label": "vol1/extent0"}``
GET         /v1/exports/{name}      one export
DELETE      /v1/exports/{name}      disconnect its clients, wipe, free
GET         /metrics                Prometheus text format
==========  ======================  ==========================================

Errors come back as ``{"error": "..."}`` with 400 (bad request), 404 (no such
export), 507 (not enough free memory: the body also has ``free_bytes``) or
503 (shutting down, or a worker failed).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from memserver.daemon import (
    Memserver,
    MemserverError,
    UnknownExportError,
    WorkerError,
)
from memserver.slabs import PoolExhaustedError, parse_size

log = logging.getLogger(__name__)

MEMSERVER_KEY = web.AppKey("memserver", Memserver)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _memserver(request: web.Request) -> Memserver:
    return request.app[MEMSERVER_KEY]


async def health(request: web.Request) -> web.Response:
    return web.json_response(_memserver(request).health())


async def list_exports(request: web.Request) -> web.Response:
    memserver = _memserver(request)
    return web.json_response(
        {"exports": [memserver.describe(r) for r in memserver.exports.values()]}
    )


async def show_export(request: web.Request) -> web.Response:
    memserver = _memserver(request)
    record = memserver.exports.get(request.match_info["name"])
    if record is None:
        return _error(404, "no export of that name on this memserver")
    return web.json_response(memserver.describe(record))


async def create_export(request: web.Request) -> web.Response:
    memserver = _memserver(request)
    try:
        body = await request.json()
    except ValueError:
        return _error(400, 'the body must be a JSON object like {"size": "64M"}')
    if not isinstance(body, dict):
        return _error(400, 'the body must be a JSON object like {"size": "64M"}')
    unknown = set(body) - {"size", "label"}
    if unknown:
        return _error(400, f"unknown fields: {', '.join(sorted(unknown))}")
    raw_size = body.get("size")
    label = body.get("label", "")
    if not isinstance(label, str) or len(label) > 256:
        return _error(400, "label must be a string of at most 256 characters")
    try:
        if isinstance(raw_size, bool) or not isinstance(raw_size, int | str):
            raise ValueError('size must be a byte count or a string like "64M"')
        size = raw_size if isinstance(raw_size, int) else parse_size(raw_size)
        record = await memserver.create_export(size, label)
    except ValueError as e:
        return _error(400, str(e))
    except PoolExhaustedError as e:
        return _error(507, str(e), free_bytes=e.free_bytes)
    except MemserverError as e:
        return _error(503, str(e))
    return web.json_response(memserver.describe(record), status=201)


async def delete_export(request: web.Request) -> web.Response:
    try:
        await _memserver(request).delete_export(request.match_info["name"])
    except UnknownExportError as e:
        return _error(404, str(e))
    except (WorkerError, MemserverError) as e:
        return _error(503, str(e))
    return web.Response(status=204)


async def metrics(request: web.Request) -> web.Response:
    memserver = _memserver(request)
    await memserver.gather_stats()
    body = generate_latest(memserver.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(memserver: Memserver) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[MEMSERVER_KEY] = memserver
    app.add_routes(
        [
            web.get("/v1/health", health),
            web.get("/v1/exports", list_exports),
            web.post("/v1/exports", create_export),
            web.get("/v1/exports/{name}", show_export),
            web.delete("/v1/exports/{name}", delete_export),
            web.get("/metrics", metrics),
        ]
    )
    return app


async def start_control(
    memserver: Memserver, host: str, port: int
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve the control API; return the runner and the bound address."""
    runner = web.AppRunner(make_app(memserver), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise MemserverError(
            f"cannot serve the control API on {host}:{port}: {e.strerror}; "
            "pick another address with --control"
        ) from e
    bound = runner.addresses[0]
    return runner, (bound[0], bound[1])
