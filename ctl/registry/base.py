"""The registry interface, and how a URL picks its backend.

``sqlite:///var/lib/rampool/registry.db`` (the default; one host, no setup)
or ``etcd://host:port`` (a cluster).  Both keep the same records
(:mod:`ctl.registry.model`) with the same guarantees:

- Every method is atomic.  Capacity is accounted in each server's
  ``reserved``; :meth:`Registry.create_volume` and :meth:`Registry.update_volume`
  check and change the reservations of every server involved and the volume
  itself in one transaction, so two clients racing for the last free space
  never both get it.
- A volume's layout changes only by compare-and-swap on its ``epoch``
  (:meth:`Registry.update_volume`), and the change is durable when the call
  returns: I/O may rely on it from then on.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from urllib.parse import urlsplit

from ctl.registry.errors import RegistryUnavailableError
from ctl.registry.model import Server, Volume

DEFAULT_REGISTRY = "sqlite:///var/lib/rampool/registry.db"
REGISTRY_ENV = "RAMPOOL_REGISTRY"


class Registry(ABC):
    """The pool's state: memservers and volumes."""

    url: str

    # Servers.

    @abstractmethod
    def add_server(self, server: Server) -> Server:
        """Record a new server (``reserved`` starts at 0).

        Raises AlreadyExistsError if the name is taken.
        """

    @abstractmethod
    def get_server(self, name: str) -> Server:
        """Raises NotFoundError."""

    @abstractmethod
    def list_servers(self) -> list[Server]:
        """Every server, sorted by name."""

    @abstractmethod
    def set_server_state(self, name: str, state: str) -> Server:
        """Change a server's state (active, draining).  Raises NotFoundError."""

    @abstractmethod
    def touch_server(self, name: str, when: float) -> None:
        """Record that the server was seen alive at ``when`` (epoch seconds)."""

    @abstractmethod
    def remove_server(self, name: str) -> None:
        """Forget a server.

        Raises InUseError while any volume has a replica on it, NotFoundError
        if there is no such server.
        """

    # Volumes.

    @abstractmethod
    def create_volume(self, volume: Volume) -> Volume:
        """Record a new volume and reserve the space of all its replicas.

        All or nothing: raises AlreadyExistsError for a taken name,
        NotFoundError for a replica on an unknown server, and
        InsufficientCapacityError (naming each short server and by how much)
        if any server lacks the space or is not active.  Returns the volume
        as stored (epoch 1).
        """

    @abstractmethod
    def get_volume(self, name: str) -> Volume:
        """Raises NotFoundError."""

    @abstractmethod
    def list_volumes(self) -> list[Volume]:
        """Every volume, sorted by name."""

    @abstractmethod
    def update_volume(self, volume: Volume, expected_epoch: int) -> Volume:
        """Store ``volume`` if the stored epoch is still ``expected_epoch``.

        The stored copy gets epoch ``expected_epoch + 1``.  Reservations follow
        the replicas: a replica added reserves space on its server (which must
        be active and have room: InsufficientCapacityError otherwise), one
        removed gives it back.  Raises EpochConflictError if the volume changed
        since it was read, NotFoundError if it is gone.
        """

    @abstractmethod
    def delete_volume(self, name: str) -> Volume:
        """Forget a volume and give its space back; return what was stored.

        Raises InUseError while it is attached, NotFoundError if unknown.
        """

    def close(self) -> None:  # noqa: B027 - backends without resources
        """Release connections or files held by the backend."""


def registry_url(explicit: str | None) -> str:
    """The URL to use: the flag, else RAMPOOL_REGISTRY, else the default."""
    return explicit or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY


def open_registry(url: str) -> Registry:
    """Open the backend a URL names."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        from ctl.registry.sqlite import SQLiteRegistry

        path = parts.path if not parts.netloc else f"/{parts.netloc}{parts.path}"
        if not path or path == "/":
            raise RegistryUnavailableError(
                f"{url}: give a file, e.g. sqlite:///var/lib/rampool/registry.db"
            )
        return SQLiteRegistry(path)
    if parts.scheme == "etcd":
        from ctl.registry.etcd import EtcdRegistry

        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or not port:
            raise RegistryUnavailableError(
                f"{url}: give etcd's client address, e.g. etcd://127.0.0.1:2379"
            )
        return EtcdRegistry(parts.hostname, port, prefix=parts.path or "/rampool")
    raise RegistryUnavailableError(
        f"unknown registry {url!r}: use sqlite:///PATH or etcd://HOST:PORT"
    )
