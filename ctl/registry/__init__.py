"""The registry: where the pool's state lives (SQLite or etcd)."""

from ctl.registry.base import (
    DEFAULT_REGISTRY,
    REGISTRY_ENV,
    Registry,
    open_registry,
    registry_url,
)
from ctl.registry.errors import (
    AlreadyExistsError,
    EpochConflictError,
    InsufficientCapacityError,
    InUseError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
)

__all__ = [
    "DEFAULT_REGISTRY",
    "REGISTRY_ENV",
    "AlreadyExistsError",
    "EpochConflictError",
    "InUseError",
    "InsufficientCapacityError",
    "NotFoundError",
    "Registry",
    "RegistryError",
    "RegistryUnavailableError",
    "open_registry",
    "registry_url",
]
