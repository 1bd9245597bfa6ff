"""Typed calls into the C library for the memory layer (cffi, ABI mode).

Addresses cross this module as plain ``int`` so callers never hold cffi objects.
Every failing call raises :class:`OSError` carrying the C ``errno`` and a message
that names the call and its main arguments. cffi releases the GIL around each C
call, so a long ``memset`` or ``mlock`` does not stall other Python threads.

Only 64-bit Linux is supported: ``off_t`` is declared as ``long`` and the constants
not exported by the standard library are the generic Linux values (x86-64, arm64).
"""

from __future__ import annotations

import logging
import mmap as _stdlib_mmap
import os
import sys

import cffi  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

if sys.platform != "linux" or sys.maxsize != 2**63 - 1:
    raise ImportError("memserver.libc needs 64-bit Linux (memfd, mlock, madvise)")

ffi = cffi.FFI()
ffi.cdef(
    """
    int memfd_create(const char *name, unsigned int flags);
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int mlock(const void *addr, size_t length);
    int munlock(const void *addr, size_t length);
    int madvise(void *addr, size_t length, int advice);
    int prctl(int option, ...);
    void *memset(void *s, int c, size_t n);
    """
)
_lib = ffi.dlopen(None)

PAGE_SIZE: int = _stdlib_mmap.PAGESIZE

# Values the standard library already knows come from the platform headers.
PROT_NONE: int = 0
PROT_READ: int = _stdlib_mmap.PROT_READ
PROT_WRITE: int = _stdlib_mmap.PROT_WRITE
MAP_SHARED: int = _stdlib_mmap.MAP_SHARED
MAP_PRIVATE: int = _stdlib_mmap.MAP_PRIVATE
MAP_ANONYMOUS: int = _stdlib_mmap.MAP_ANONYMOUS
MAP_POPULATE: int = _stdlib_mmap.MAP_POPULATE
MADV_DONTDUMP: int = _stdlib_mmap.MADV_DONTDUMP
MADV_HUGEPAGE: int = _stdlib_mmap.MADV_HUGEPAGE
MFD_CLOEXEC: int = os.MFD_CLOEXEC

# Python 3.11 does not export these; values from the kernel's uapi headers.
MAP_FIXED: int = 0x10
MAP_NORESERVE: int = 0x4000
MADV_POPULATE_WRITE: int = 23  # Linux 5.14+
PR_SET_IO_FLUSHER: int = 57  # Linux 5.6+, needs CAP_SYS_RESOURCE
PR_GET_IO_FLUSHER: int = 58

#: mmap's failure value, ``(void *) -1``, as an unsigned address.
MAP_FAILED: int = 2**64 - 1


def _address(pointer: object) -> int:
    return int(ffi.cast("uintptr_t", pointer))


def _pointer(address: int) -> object:
    return ffi.cast("void *", address)


def _error(call: str, detail: str) -> OSError:
    # Read errno first: anything else may overwrite cffi's saved copy.
    err = int(ffi.errno)
    return OSError(err, f"{call}({detail}) failed: {os.strerror(err)}")


def memfd_create(name: str, flags: int = MFD_CLOEXEC) -> int:
    """Create an anonymous shared-memory file and return its descriptor."""
    fd = int(_lib.memfd_create(name.encode(), flags))
    if fd < 0:
        raise _error("memfd_create", f"name={name!r}, flags={flags:#x}")
    return fd


def mmap(
    length: int,
    prot: int,
    flags: int,
    fd: int = -1,
    offset: int = 0,
    address: int = 0,
) -> int:
    """Map ``length`` bytes and return the mapping's address.

    ``address`` is a hint, or the exact place when ``flags`` has MAP_FIXED.
    """
    result = _address(_lib.mmap(_pointer(address), length, prot, flags, fd, offset))
    if result == MAP_FAILED:
        raise _error(
            "mmap",
            f"address={address:#x}, length={length}, prot={prot:#x}, "
            f"flags={flags:#x}, fd={fd}, offset={offset}",
        )
    return result


def munmap(address: int, length: int) -> None:
    """Remove every mapping in ``[address, address + length)``."""
    if _lib.munmap(_pointer(address), length) != 0:
        raise _error("munmap", f"address={address:#x}, length={length}")


def mlock(address: int, length: int) -> None:
    """Fault in and pin the pages of a range so they are never swapped out."""
    if _lib.mlock(_pointer(address), length) != 0:
        raise _error("mlock", f"address={address:#x}, length={length}")


def munlock(address: int, length: int) -> None:
    """Undo :func:`mlock` for a range."""
    if _lib.munlock(_pointer(address), length) != 0:
        raise _error("munlock", f"address={address:#x}, length={length}")


def madvise(address: int, length: int, advice: int) -> None:
    """Give the kernel ``advice`` (a MADV_* value) about a range."""
    if _lib.madvise(_pointer(address), length, advice) != 0:
        raise _error(
            "madvise", f"address={address:#x}, length={length}, advice={advice}"
        )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0) -> int:
    """Call prctl(2) and return its non-negative result."""
    # prctl is variadic: cffi needs each extra argument's C type spelled out.
    args = [ffi.cast("unsigned long", value) for value in (arg2, arg3, arg4, 0)]
    result = int(_lib.prctl(option, *args))
    if result < 0:
        raise _error("prctl", f"option={option}, arg2={arg2}")
    return result


def memset(address: int, value: int, length: int) -> None:
    """Fill ``length`` bytes at ``address`` with the byte ``value``."""
    _lib.memset(_pointer(address), value, length)


def memory_view(address: int, length: int) -> memoryview:
    """Return a writable byte view of ``length`` bytes at ``address``.

    The view does not own the memory: it must not be touched after the range is
    unmapped (doing so crashes the process).
    """
    return memoryview(ffi.buffer(ffi.cast("char *", address), length))
