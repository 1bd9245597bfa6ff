"""The etcd backend of the registry, for a cluster: ``etcd://host:port[/prefix]``.

It speaks to etcd 3.4 or later through the JSON gateway on etcd's client
port (``POST /v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/grant``...), with
the standard library only.  Records live under a prefix, ``/rampool`` unless
the URL names another, as the JSON of their ``to_dict()``::

    {prefix}/servers/{name}   a Server
    {prefix}/volumes/{name}   a Volume
    {prefix}/alive/{name}     exists while that memserver keeps its lease

Several pools may share one etcd under different prefixes, as long as no
prefix lies inside another (``/a`` and ``/a/servers`` would overlap).

Concurrency is optimistic.  A change reads the records it involves, with
their ``mod_revision``, works out the new records, and commits them in one
etcd transaction that applies only if none of the records it read has
changed (and none it found missing has appeared).  If another client got
there first, the change reads again and starts over, up to
``max_attempts`` times with a short random pause, so every check ("the
server has room", "the epoch is still 4") holds against what is committed:
two clients never both get the last free space.

Liveness: a memserver calls :meth:`EtcdRegistry.heartbeat` once; it grants a
lease of ``ttl`` seconds and puts the server's alive key under it.  The
memserver then calls :meth:`EtcdRegistry.keepalive` well within every
``ttl`` (every third of it, say).  If it dies or loses the network, the lease
runs out and etcd itself deletes the alive key; :meth:`EtcdRegistry.alive_servers`
lists the names whose key is still there.  ``keepalive`` raises NotFoundError
once the lease has expired: call ``heartbeat`` again.  On a clean shutdown,
:meth:`EtcdRegistry.stop_heartbeat` removes the key at once.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ctl.registry.base import Registry
from ctl.registry.errors import (
    AlreadyExistsError,
    EpochConflictError,
    InUseError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from ctl.registry.model import (
    SERVER_STATES,
    Server,
    Volume,
    check_server_unused,
    reservation_change,
)

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "/rampool"
DEFAULT_TIMEOUT = 5.0  # seconds for one HTTP request to etcd
DEFAULT_MAX_ATTEMPTS = 50

# Pause between attempts: random up to min(cap, base * 2**attempt) seconds,
# so clients that collided spread out instead of colliding again.
_BACKOFF_BASE = 0.002
_BACKOFF_CAP = 0.05

# gRPC status codes, as the gateway puts them in its error replies.
_GRPC_DEADLINE_EXCEEDED = 4
_GRPC_NOT_FOUND = 5
_GRPC_UNAVAILABLE = 14

T = TypeVar("T")


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode(data: str) -> bytes:
    return base64.b64decode(data)


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix``."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        raise ValueError("a prefix of only 0xff bytes has no end")
    end[-1] += 1
    return bytes(end)


def _put(key: str, record: dict[str, Any]) -> dict[str, Any]:
    value = json.dumps(record, sort_keys=True).encode()
    return {"request_put": {"key": _encode(key.encode()), "value": _encode(value)}}


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _encode(key.encode())}}


def _unchanged(key: str, mod_revision: int) -> dict[str, Any]:
    """A compare that holds while ``key`` was not written since ``mod_revision``."""
    return {
        "key": _encode(key.encode()),
        "target": "MOD",
        "result": "EQUAL",
        "mod_revision": str(mod_revision),
    }


def _absent(key: str) -> dict[str, Any]:
    """A compare that holds while ``key`` does not exist."""
    return {
        "key": _encode(key.encode()),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": "0",
    }


@dataclass
class _Record:
    key: str
    value: dict[str, Any]
    mod_revision: int


class _Reads:
    """What one attempt of a change read, and the compares that prove it is
    still what etcd holds when the change commits."""

    def __init__(self, registry: EtcdRegistry) -> None:
        self._registry = registry
        self.compares: list[dict[str, Any]] = []

    def get(self, key: str) -> dict[str, Any] | None:
        return self.get_many([key])[key]

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        wanted = list(dict.fromkeys(keys))
        found = self._registry._get_many(wanted)
        for key in wanted:
            if key in found:
                self.compares.append(_unchanged(key, found[key].mod_revision))
            else:
                self.compares.append(_absent(key))
        return {key: found[key].value if key in found else None for key in wanted}

    def scan(self, prefix: str) -> list[dict[str, Any]]:
        """Every record under ``prefix``.

        The compare requires that no key under it was created or changed
        since; one deleted meanwhile goes unnoticed, which is fine for the
        only use, a search for records that forbid a change.
        """
        revision, records = self._registry._scan(prefix)
        start = prefix.encode()
        self.compares.append(
            {
                "key": _encode(start),
                "range_end": _encode(_prefix_end(start)),
                "target": "MOD",
                "result": "LESS",
                "mod_revision": str(revision + 1),
            }
        )
        return [record.value for record in records]


class EtcdRegistry(Registry):
    """The registry kept in etcd at ``host:port``, under ``prefix``.

    Connects lazily: nothing is sent until the first call, and every call
    raises RegistryUnavailableError if etcd cannot be reached.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        root = prefix.strip("/")
        # "/" (the URL etcd://host:port/) keeps the records at etcd's top level.
        self.prefix = f"/{root}" if root else ""
        self.url = f"etcd://{hostport}{self.prefix or '/'}"
        self.address = hostport
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._base = f"http://{hostport}"
        # etcd is reached directly: an http_proxy from the environment must not
        # carry the pool's state through some other host.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # Servers.

    def add_server(self, server: Server) -> Server:
        stored = replace(server, reserved=0)
        key = self._server_key(server.name)
        reply = self._call(
            "/v3/kv/txn",
            {"compare": [_absent(key)], "success": [_put(key, stored.to_dict())]},
        )
        if not reply.get("succeeded", False):
            raise AlreadyExistsError(f"server {server.name!r} exists already")
        logger.debug("server added name=%s", server.name)
        return stored

    def get_server(self, name: str) -> Server:
        key = self._server_key(name)
        found = self._get_many([key])
        if key not in found:
            raise _no_server(name)
        return Server.from_dict(found[key].value)

    def list_servers(self) -> list[Server]:
        _, records = self._scan(self._server_key(""))
        servers = [Server.from_dict(record.value) for record in records]
        return sorted(servers, key=lambda server: server.name)

    def set_server_state(self, name: str, state: str) -> Server:
        if state not in SERVER_STATES:
            raise ValueError(
                f"unknown server state {state!r}: use one of {', '.join(SERVER_STATES)}"
            )

        def plan(reads: _Reads) -> tuple[Server, list[dict[str, Any]]]:
            server = replace(self._read_server(reads, name), state=state)
            return server, [_put(self._server_key(name), server.to_dict())]

        return self._optimistic(f"set the state of server {name}", plan)

    def touch_server(self, name: str, when: float) -> None:
        def plan(reads: _Reads) -> tuple[None, list[dict[str, Any]]]:
            server = replace(self._read_server(reads, name), last_seen=when)
            return None, [_put(self._server_key(name), server.to_dict())]

        self._optimistic(f"record that server {name} is alive", plan)

    def remove_server(self, name: str) -> None:
        def plan(reads: _Reads) -> tuple[None, list[dict[str, Any]]]:
            self._read_server(reads, name)
            check_server_unused(
                name, map(Volume.from_dict, reads.scan(self._volume_key("")))
            )
            return None, [
                _delete(self._server_key(name)),
                _delete(self._alive_key(name)),
            ]

        self._optimistic(f"remove server {name}", plan)

    # Volumes.

    def create_volume(self, volume: Volume) -> Volume:
        def plan(reads: _Reads) -> tuple[Volume, list[dict[str, Any]]]:
            if reads.get(self._volume_key(volume.name)) is not None:
                raise AlreadyExistsError(f"volume {volume.name!r} exists already")
            servers = self._read_servers(reads, volume.name, _servers_of(volume))
            stored = replace(Volume.from_dict(volume.to_dict()), epoch=1)
            change = reservation_change(
                volume.name, servers, stored.reservations(servers), {}
            )
            ops = [_put(self._volume_key(volume.name), stored.to_dict())]
            ops += self._reserve(servers, change)
            return stored, ops

        return self._optimistic(f"create volume {volume.name}", plan)

    def get_volume(self, name: str) -> Volume:
        key = self._volume_key(name)
        found = self._get_many([key])
        if key not in found:
            raise _no_volume(name)
        return Volume.from_dict(found[key].value)

    def list_volumes(self) -> list[Volume]:
        _, records = self._scan(self._volume_key(""))
        volumes = [Volume.from_dict(record.value) for record in records]
        return sorted(volumes, key=lambda volume: volume.name)

    def update_volume(self, volume: Volume, expected_epoch: int) -> Volume:
        def plan(reads: _Reads) -> tuple[Volume, list[dict[str, Any]]]:
            raw = reads.get(self._volume_key(volume.name))
            if raw is None:
                raise _no_volume(volume.name)
            current = Volume.from_dict(raw)
            # Checked on every attempt: a retry after a conflict must not
            # overwrite a layout that someone else changed in between.
            if current.epoch != expected_epoch:
                raise EpochConflictError(
                    f"volume {volume.name!r} changed since it was read (epoch "
                    f"{current.epoch}, expected {expected_epoch}): read it again "
                    "and retry"
                )
            involved = _servers_of(current) | _servers_of(volume)
            servers = self._read_servers(reads, volume.name, involved)
            stored = replace(
                Volume.from_dict(volume.to_dict()), epoch=expected_epoch + 1
            )
            change = reservation_change(
                volume.name,
                servers,
                stored.reservations(servers),
                current.reservations(servers),
            )
            ops = [_put(self._volume_key(volume.name), stored.to_dict())]
            ops += self._reserve(servers, change)
            return stored, ops

        return self._optimistic(f"update volume {volume.name}", plan)

    def delete_volume(self, name: str) -> Volume:
        def plan(reads: _Reads) -> tuple[Volume, list[dict[str, Any]]]:
            raw = reads.get(self._volume_key(name))
            if raw is None:
                raise _no_volume(name)
            stored = Volume.from_dict(raw)
            if stored.attached_to:
                raise InUseError(
                    f"volume {name!r} is attached to {stored.attached_to}: "
                    "detach it first"
                )
            servers = self._read_servers(reads, name, _servers_of(stored))
            change = reservation_change(name, servers, {}, stored.reservations(servers))
            ops = [_delete(self._volume_key(name))]
            ops += self._reserve(servers, change)
            return stored, ops

        return self._optimistic(f"delete volume {name}", plan)

    # Liveness.

    def heartbeat(self, name: str, ttl: int) -> int:
        """Mark server ``name`` alive for ``ttl`` seconds; return the lease id.

        Keep it alive with :meth:`keepalive`.  etcd rounds a ``ttl`` below
        its minimum (about 2 s on a single node) up to that minimum.
        """
        if ttl < 1:
            raise ValueError(f"a heartbeat's ttl is whole seconds >= 1, not {ttl}")
        lease = int(self._call("/v3/lease/grant", {"TTL": ttl})["ID"])
        value = json.dumps({"lease": lease, "ttl": ttl}).encode()
        self._call(
            "/v3/kv/put",
            {
                "key": _encode(self._alive_key(name).encode()),
                "value": _encode(value),
                "lease": str(lease),
            },
        )
        logger.debug("heartbeat name=%s lease=%x ttl=%d", name, lease, ttl)
        return lease

    def keepalive(self, lease_id: int) -> int:
        """Renew a heartbeat's lease; return its ttl in seconds.

        Raises NotFoundError once the lease has expired (the alive key is
        gone): call :meth:`heartbeat` again.
        """
        reply = self._call("/v3/lease/keepalive", {"ID": str(lease_id)})
        # keepalive is a stream in gRPC: the gateway wraps each message in
        # "result", a failure in "error", and an unknown lease is a result
        # without a TTL.
        if "error" in reply:
            raise RegistryUnavailableError(
                f"etcd at {self.address} could not renew lease {lease_id:x}: "
                f"{reply['error']}; check the cluster's health and retry"
            )
        ttl = int(reply.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            raise NotFoundError(
                f"lease {lease_id:x} has expired and its alive key is gone: "
                "call heartbeat again"
            )
        return ttl

    def stop_heartbeat(self, lease_id: int) -> None:
        """Revoke a heartbeat's lease, deleting its alive key now.

        A lease that has expired already is not an error.
        """
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease_id)})
        except NotFoundError:
            logger.debug("lease already gone lease=%x", lease_id)

    def alive_servers(self) -> set[str]:
        """Names of the servers whose heartbeat lease is current."""
        start = self._alive_key("")
        _, records = self._scan(start)
        return {record.key[len(start) :] for record in records}

    # Keys.

    def _server_key(self, name: str) -> str:
        return f"{self.prefix}/servers/{name}"

    def _volume_key(self, name: str) -> str:
        return f"{self.prefix}/volumes/{name}"

    def _alive_key(self, name: str) -> str:
        return f"{self.prefix}/alive/{name}"

    # Reading inside a change.

    def _read_server(self, reads: _Reads, name: str) -> Server:
        raw = reads.get(self._server_key(name))
        if raw is None:
            raise _no_server(name)
        return Server.from_dict(raw)

    def _read_servers(
        self, reads: _Reads, volume: str, names: set[str]
    ) -> dict[str, Server]:
        """The servers ``names``, read in one request; NotFoundError names
        every one that is missing."""
        ordered = sorted(names)
        found = reads.get_many(self._server_key(name) for name in ordered)
        servers: dict[str, Server] = {}
        unknown = []
        for name in ordered:
            raw = found[self._server_key(name)]
            if raw is None:
                unknown.append(name)
            else:
                servers[name] = Server.from_dict(raw)
        if unknown:
            raise NotFoundError(
                f"volume {volume!r} has replicas on unknown servers "
                f"{', '.join(unknown)}: add them first (rampool server add)"
            )
        return servers

    def _reserve(
        self, servers: dict[str, Server], change: dict[str, int]
    ) -> list[dict[str, Any]]:
        """The puts that add ``change`` to the servers' reservations."""
        ops = []
        for name, amount in sorted(change.items()):
            if amount:
                servers[name].reserved += amount
                ops.append(_put(self._server_key(name), servers[name].to_dict()))
        return ops

    def _optimistic(
        self, what: str, plan: Callable[[_Reads], tuple[T, list[dict[str, Any]]]]
    ) -> T:
        """Run ``plan`` and commit its operations if nothing it read changed;
        start over otherwise.

        ``plan`` reads through the ``_Reads`` it gets and returns the result
        with the operations to commit; a RegistryError it raises ends the
        change with nothing written.
        """
        for attempt in range(1, self.max_attempts + 1):
            reads = _Reads(self)
            result, ops = plan(reads)
            if self._commit(reads.compares, ops):
                if attempt > 1:
                    logger.debug("committed op=%r attempts=%d", what, attempt)
                return result
            logger.debug("conflict op=%r attempt=%d", what, attempt)
            if attempt < self.max_attempts:
                time.sleep(
                    random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
                )
        logger.warning(
            "gave up op=%r attempts=%d etcd=%s", what, self.max_attempts, self.address
        )
        raise RegistryUnavailableError(
            f"could not {what}: other clients of etcd at {self.address} kept "
            f"changing the same records through {self.max_attempts} attempts; "
            "try again"
        )

    # The gateway.

    def _commit(
        self, compares: list[dict[str, Any]], ops: list[dict[str, Any]]
    ) -> bool:
        reply = self._call("/v3/kv/txn", {"compare": compares, "success": ops})
        return bool(reply.get("succeeded", False))

    def _get_many(self, keys: list[str]) -> dict[str, _Record]:
        """The records of ``keys`` that exist, read at one revision."""
        if len(keys) == 1:
            replies = [self._call("/v3/kv/range", {"key": _encode(keys[0].encode())})]
        else:
            ops = [{"request_range": {"key": _encode(key.encode())}} for key in keys]
            txn = self._call("/v3/kv/txn", {"success": ops})
            replies = [r["response_range"] for r in txn.get("responses", [])]
        found = {}
        for reply in replies:
            for kv in reply.get("kvs", []):
                record = self._record(kv)
                found[record.key] = record
        return found

    def _scan(self, prefix: str) -> tuple[int, list[_Record]]:
        """The revision read at, and every record whose key starts with
        ``prefix``, in key order."""
        start = prefix.encode()
        reply = self._call(
            "/v3/kv/range",
            {"key": _encode(start), "range_end": _encode(_prefix_end(start))},
        )
        revision = int(reply["header"]["revision"])
        return revision, [self._record(kv) for kv in reply.get("kvs", [])]

    def _record(self, kv: dict[str, Any]) -> _Record:
        key = _decode(kv["key"]).decode()
        raw = _decode(kv.get("value", ""))
        try:
            value = json.loads(raw)
        except ValueError:
            raise RegistryError(
                f"etcd at {self.address} holds {key!r}, which is not a rampool "
                "record: is another program using this prefix? Pick another "
                "prefix (etcd://host:port/PREFIX)"
            ) from None
        return _Record(key, value, int(kv["mod_revision"]))

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the gateway's ``path``; return the decoded reply."""
        request = urllib.request.Request(
            self._base + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise self._refused(path, e.code, e.read()) from None
        except (OSError, http.client.HTTPException) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise RegistryUnavailableError(
                f"etcd at {self.address} is unreachable ({reason}): check that "
                f"etcd is running and serves clients on {self.address} "
                "(its --listen-client-urls), or choose another registry with "
                "--registry or RAMPOOL_REGISTRY"
            ) from e
        reply = _json_object(raw)
        if reply is None:
            raise self._not_etcd(path)
        return reply

    def _refused(self, path: str, status: int, raw: bytes) -> RegistryError:
        reply = _json_object(raw)
        if reply is None or "code" not in reply:
            return self._not_etcd(path)
        code, message = reply["code"], reply.get("message", "")
        if code == _GRPC_NOT_FOUND:
            return NotFoundError(f"etcd at {self.address}: {message}")
        if code in (_GRPC_DEADLINE_EXCEEDED, _GRPC_UNAVAILABLE) or status >= 500:
            return RegistryUnavailableError(
                f"etcd at {self.address} cannot serve {path} now ({message}): "
                "check the cluster's health (etcdctl endpoint health) and retry"
            )
        return RegistryError(f"etcd at {self.address} refused {path}: {message}")

    def _not_etcd(self, path: str) -> RegistryUnavailableError:
        return RegistryUnavailableError(
            f"{self.address} answered {path} but not as etcd's JSON gateway "
            "does: is it etcd's client port, and is etcd 3.4 or later?"
        )


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _servers_of(volume: Volume) -> set[str]:
    return {r.server for extent in volume.extents for r in extent.replicas}


def _no_server(name: str) -> NotFoundError:
    return NotFoundError(f"no server named {name!r}: see rampool server list")


def _no_volume(name: str) -> NotFoundError:
    return NotFoundError(f"no volume named {name!r}: see rampool volume list")
