"""One connection limit shared by every worker process of a memserver.

Connections land on whichever worker accepts first, so a per-worker share of
the limit would refuse clients while another worker has room.  Instead each
worker owns one 64-bit slot in a small shared memfd holding its count of open
connections.  Admitting takes a POSIX record lock on the memfd (it excludes
other processes; within a worker only the accept thread admits), sums the
slots and bumps the worker's own.  Releasing only lowers the worker's own
slot, an aligned 8-byte store, which other processes read whole; a count read
while a release is under way errs on the side of refusing.

The master zeroes a dead worker's slot before starting its replacement: the
connections it counted died with it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

SLOT = struct.Struct("=q")


def create_table(workers: int) -> int:
    """Make the shared table for ``workers`` workers; return its descriptor."""
    fd = os.memfd_create("rampool-connections", os.MFD_CLOEXEC)
    os.ftruncate(fd, SLOT.size * workers)
    return fd


class ConnectionTable:
    """A view of the shared table from one process."""

    def __init__(self, fd: int, workers: int, limit: int) -> None:
        self.fd = fd
        self.workers = workers
        self.limit = limit
        self._map = mmap.mmap(fd, SLOT.size * workers)

    def count(self, index: int) -> int:
        return int(SLOT.unpack_from(self._map, index * SLOT.size)[0])

    def total(self) -> int:
        return sum(self.count(i) for i in range(self.workers))

    def _set(self, index: int, value: int) -> None:
        SLOT.pack_into(self._map, index * SLOT.size, value)

    def admit(self, index: int) -> bool:
        """Count one more connection for worker ``index`` if the limit allows."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if self.total() >= self.limit:
                return False
            self._set(index, self.count(index) + 1)
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def release(self, index: int) -> None:
        """One of worker ``index``'s connections ended (caller serialises)."""
        self._set(index, self.count(index) - 1)

    def reset(self, index: int) -> None:
        """Forget worker ``index``'s connections (it died; master only)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            self._set(index, 0)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
