"""The memserver's pooled memory: one shared-memory arena and per-export mappings.

The master process calls :meth:`Arena.create` once. The arena is a memfd, mapped
whole, excluded from core dumps and, unless the operator chose ``--no-mlock``,
locked in RAM so that memory serving someone's swap is never itself swapped.

Worker processes are started with the arena's descriptor (``pass_fds``) and map
only the slabs of the exports they serve, with :class:`ExportMapping`: the slabs
of one export appear at consecutive addresses even when they lie apart in the
arena, so the NBD layer sees every export as one flat ``memoryview``.

Views handed out by :meth:`Arena.view` and :attr:`ExportMapping.view` point
straight into the mapping. Touching one after its mapping is unmapped would crash
the whole process, so ``close()`` refuses (:class:`ArenaError`) while any such
view is still alive: callers must release them or drop every reference first.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import resource
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self

from memserver import libc
from memserver.slabs import format_size

log = logging.getLogger(__name__)

SHMEM_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")

# mlock errors that mean "not allowed" or "over the limit" rather than a bug.
_LOCK_REFUSED = frozenset({errno.EPERM, errno.ENOMEM, errno.EAGAIN})

# The page-touching fallback reads this much at a time, to bound its temporary.
_TOUCH_CHUNK = 1 << 30


class ArenaError(Exception):
    """The arena or an export mapping could not be set up, used or released."""


class ArenaLockError(ArenaError):
    """The kernel refused to lock pooled memory in RAM.

    The message tells the operator how to allow it, or how to run without it.
    """

    def __init__(self, message: str, *, errnum: int | None, size: int) -> None:
        super().__init__(message)
        self.errno = errnum
        self.size = size


def _lock_error(what: str, size: int, exc: OSError) -> ArenaLockError:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    message = (
        f"cannot lock {what} ({format_size(size)}) in RAM: {exc.strerror}. "
        f"The memserver pins pooled memory so it is never swapped. This process "
        f"may lock at most soft={_format_limit(soft)} hard={_format_limit(hard)} "
        f"(RLIMIT_MEMLOCK). To allow it, do one of: raise the limit "
        f"(`ulimit -l unlimited` in the starting shell, or `LimitMEMLOCK=infinity` "
        f"in the systemd unit); grant the process CAP_IPC_LOCK (systemd: "
        f"`AmbientCapabilities=CAP_IPC_LOCK`); make sure the host has "
        f"{format_size(size)} of RAM free. Or start with --no-mlock to run "
        f"unlocked: pooled memory may then be swapped out."
    )
    return ArenaLockError(message, errnum=exc.errno, size=size)


def _format_limit(limit: int) -> str:
    if limit == resource.RLIM_INFINITY:
        return "unlimited"
    return format_size(limit)


def _shmem_thp_setting() -> str | None:
    """Return the active shmem THP mode ("never", "advise", ...), None if absent."""
    try:
        text = SHMEM_THP_SETTING.read_text()
    except OSError:
        return None
    # The file lists every mode and brackets the active one: "always [never] ...".
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def _advise_huge_pages(address: int, size: int) -> str:
    """Ask for transparent huge pages and describe whether the kernel will use them."""
    setting = _shmem_thp_setting()
    if setting is None:
        return f"disabled (this kernel has no {SHMEM_THP_SETTING})"
    try:
        libc.madvise(address, size, libc.MADV_HUGEPAGE)
    except OSError as exc:
        return f"disabled (shmem_enabled={setting}; MADV_HUGEPAGE refused: {exc})"
    if setting in ("never", "deny"):
        return (
            f"disabled (shmem_enabled={setting}; to enable: echo advise > "
            f"{SHMEM_THP_SETTING})"
        )
    return f"enabled (shmem_enabled={setting})"


def _populate(address: int, view: memoryview) -> None:
    """Fault in every page of a mapping so a first write costs no page fault."""
    try:
        libc.madvise(address, len(view), libc.MADV_POPULATE_WRITE)
        return
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise ArenaError(
                f"cannot populate {format_size(len(view))} of shared memory: "
                f"{exc}; check that the host has that much RAM free"
            ) from exc
    # Kernels before 5.14 lack MADV_POPULATE_WRITE.
    log.debug("populate fallback=touch length=%d", len(view))
    _touch_pages(view)


def _fault_in(what: str, mapping: _Mapping, *, lock: bool) -> None:
    """Bring every page in now: pinned with mlock, or populated if unlocked."""
    if not lock:
        _populate(mapping.address, mapping.view)
        return
    try:
        libc.mlock(mapping.address, mapping.size)
    except OSError as exc:
        if exc.errno in _LOCK_REFUSED:
            raise _lock_error(what, mapping.size, exc) from exc
        raise


def _touch_pages(view: memoryview) -> None:
    """Fault in a shared-memory mapping by reading one byte of every page.

    Reading cannot race with writers in other processes, and shmem needs no
    write notification, so the kernel maps each page writable at once.
    """
    for start in range(0, len(view), _TOUCH_CHUNK):
        view[start : start + _TOUCH_CHUNK : libc.PAGE_SIZE].tobytes()


class _Mapping:
    """An address range this process mapped, with one view over all of it."""

    def __init__(self, address: int, size: int) -> None:
        self.address = address
        self.size = size
        self._view: memoryview | None = libc.memory_view(address, size)

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ArenaError("the mapping is closed")
        return self._view

    @property
    def closed(self) -> bool:
        return self._view is None

    def unmap(self) -> None:
        """Unmap the range, unless views into it are still alive."""
        view = self._view
        if view is None:
            return
        exporter = weakref.ref(view.obj)
        try:
            view.release()
        except BufferError as exc:
            raise ArenaError(
                f"cannot unmap: a buffer of the mapping is still exported ({exc})"
            ) from exc
        # Every slice of the view keeps the exporter alive; it dies only once no
        # view of the range is left, and only then is unmapping safe.
        del view
        self._view = None
        if exporter() is not None:
            gc.collect()
        survivor = exporter()
        if survivor is not None:
            self._view = memoryview(survivor)
            raise ArenaError(
                f"cannot unmap {format_size(self.size)} at {self.address:#x}: views "
                f"of it are still alive; release them (memoryview.release()) or "
                f"drop every reference first"
            )
        libc.munmap(self.address, self.size)


class _ClosedOnExit:
    """``with`` support for the mappings below: ``close()`` on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Arena(_ClosedOnExit):
    """The memserver's pool of memory: a locked, shared memfd mapped whole.

    Build one with :meth:`Arena.create`. ``fd`` can be handed to worker processes
    (``subprocess`` ``pass_fds``), which map parts of it with
    :class:`ExportMapping`.
    """

    def __init__(
        self, fd: int, mapping: _Mapping, *, locked: bool, huge_pages: str
    ) -> None:
        self.fd = fd
        self.size = mapping.size
        self.address = mapping.address
        self.locked = locked
        self.huge_pages = huge_pages
        self._mapping = mapping
        self._fd_open = True

    @classmethod
    def create(
        cls, size: int, *, lock: bool = True, name: str = "rampool-arena"
    ) -> Arena:
        """Create, map and fill an arena of ``size`` bytes.

        ``size`` must be a positive multiple of the page size. With ``lock`` the
        memory is pinned with mlock; an :class:`ArenaLockError` says how to allow
        that. Without it every page is faulted in now, but may later be swapped.
        """
        if size <= 0 or size % libc.PAGE_SIZE:
            raise ArenaError(
                f"arena size must be a positive multiple of {libc.PAGE_SIZE} "
                f"bytes, got {size}"
            )
        fd = libc.memfd_create(name, libc.MFD_CLOEXEC)
        mapping: _Mapping | None = None
        try:
            os.ftruncate(fd, size)
            address = libc.mmap(
                size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd
            )
            mapping = _Mapping(address, size)
            libc.madvise(address, size, libc.MADV_DONTDUMP)
            huge_pages = _advise_huge_pages(address, size)
            _fault_in("the arena", mapping, lock=lock)
        except BaseException:
            if mapping is not None:
                mapping.unmap()
            os.close(fd)
            raise
        if lock:
            log.info("arena ready size=%d locked=yes huge_pages=%r", size, huge_pages)
        else:
            log.warning(
                "arena ready size=%d locked=no huge_pages=%r "
                "(unlocked: pooled memory may be swapped)",
                size,
                huge_pages,
            )
        return cls(fd, mapping, locked=lock, huge_pages=huge_pages)

    def view(self, offset: int, length: int) -> memoryview:
        """Return a writable view of ``length`` bytes at ``offset`` in the arena."""
        self._check_range(offset, length)
        return self._mapping.view[offset : offset + length]

    def zero(self, offset: int, length: int) -> None:
        """Overwrite ``length`` bytes at ``offset`` with zeros (GIL released)."""
        self._check_range(offset, length)
        libc.memset(self.address + offset, 0, length)

    def close(self) -> None:
        """Unmap the arena and close its descriptor. Safe to call twice.

        Raises :class:`ArenaError`, leaving the arena open, while views from
        :meth:`view` are alive.
        """
        self._mapping.unmap()
        if self._fd_open:
            self._fd_open = False
            os.close(self.fd)
            log.info("arena closed size=%d", self.size)

    def _check_range(self, offset: int, length: int) -> None:
        if self._mapping.closed:
            raise ArenaError("the arena is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range offset={offset} length={length} is outside the arena "
                f"of {self.size} bytes"
            )


class ExportMapping(_ClosedOnExit):
    """One export's slabs of the arena, mapped as one contiguous range.

    ``runs`` are ``(file_offset, length)`` pieces of the arena's memfd ``fd``, in
    export order (see :func:`memserver.slabs.slab_runs`); both numbers must be
    page aligned and inside the file. The pieces are placed back to back, so
    :attr:`view` is one writable ``memoryview`` of the whole export. With
    ``lock`` the pages are pinned (:class:`ArenaLockError` if refused), otherwise
    they are faulted in up front. ``fd`` stays owned by the caller.
    """

    def __init__(self, fd: int, runs: list[tuple[int, int]], *, lock: bool) -> None:
        size = self._check_runs(fd, runs)
        # Reserve one contiguous stretch of address space, then lay each run of
        # the memfd over its part of it, so the export reads as one buffer.
        address = libc.mmap(
            size,
            libc.PROT_NONE,
            libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE,
        )
        try:
            position = address
            for file_offset, length in runs:
                libc.mmap(
                    length,
                    libc.PROT_READ | libc.PROT_WRITE,
                    libc.MAP_SHARED | libc.MAP_FIXED,
                    fd,
                    file_offset,
                    address=position,
                )
                position += length
            libc.madvise(address, size, libc.MADV_DONTDUMP)
            self._mapping = _Mapping(address, size)
            _fault_in("an export", self._mapping, lock=lock)
        except BaseException:
            libc.munmap(address, size)
            raise
        self.size = size
        self.address = address
        self.locked = lock
        log.debug("export mapped size=%d runs=%d locked=%s", size, len(runs), lock)

    @staticmethod
    def _check_runs(fd: int, runs: list[tuple[int, int]]) -> int:
        if not runs:
            raise ArenaError("an export needs at least one run of the arena")
        file_size = os.fstat(fd).st_size
        for file_offset, length in runs:
            if file_offset % libc.PAGE_SIZE or length % libc.PAGE_SIZE or length <= 0:
                raise ArenaError(
                    f"run offset={file_offset} length={length} is not a positive, "
                    f"{libc.PAGE_SIZE}-byte aligned piece of the arena"
                )
            # Touching a mapping past the end of a memfd kills the process with
            # SIGBUS, so a bad run must be refused here.
            if file_offset < 0 or file_offset + length > file_size:
                raise ArenaError(
                    f"run offset={file_offset} length={length} lies outside the "
                    f"arena of {file_size} bytes"
                )
        return sum(length for _, length in runs)

    @property
    def view(self) -> memoryview:
        """The whole export as one writable view; raises ArenaError once closed."""
        return self._mapping.view

    def close(self) -> None:
        """Unmap the export. Safe to call twice.

        Raises :class:`ArenaError`, leaving the mapping in place, while any view
        of it (including slices of :attr:`view`) is alive.
        """
        if not self._mapping.closed:
            self._mapping.unmap()
            log.debug("export unmapped size=%d", self.size)
