"""Errors of the registry, split by what the caller must do."""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every registry error; the message is meant for the operator."""


class RegistryUnavailableError(RegistryError):
    """The registry cannot be reached or opened (bad URL, etcd down)."""


class NotFoundError(RegistryError):
    """No server or volume of that name."""


class AlreadyExistsError(RegistryError):
    """A server or volume of that name exists already."""


class InsufficientCapacityError(RegistryError):
    """The servers named cannot hold what was asked; nothing was taken.

    ``missing`` maps server name to the bytes it lacks (or, for placement,
    a description of what is short).
    """

    def __init__(self, message: str, missing: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or {}


class EpochConflictError(RegistryError):
    """The volume's layout changed since it was read: read again and retry."""


class InUseError(RegistryError):
    """The object is still in use (a server holding data, an attached volume)."""
