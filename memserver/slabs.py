"""Carving the arena into slabs, and the sizes operators type and read.

The arena is cut into equal slabs; an export owns a list of slab indices, in the
order its bytes appear. :class:`SlabAllocator` hands out those lists, preferring
one contiguous run so that an export maps as few pieces as possible.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Iterable
from fractions import Fraction

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_SLAB_SIZE = 16 * MiB
#: Slabs are whole transparent huge pages, so a slab never splits one.
MIN_SLAB_SIZE = 2 * MiB

_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_SIZE_PATTERN = re.compile(
    r"(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[kmgtpe])(?:i?b)?|b)?",
    re.IGNORECASE,
)


class PoolExhaustedError(Exception):
    """An allocation asked for more slabs than are free."""

    def __init__(self, requested_slabs: int, free_slabs: int, slab_size: int) -> None:
        self.requested_slabs = requested_slabs
        self.free_slabs = free_slabs
        self.slab_size = slab_size
        super().__init__(
            f"pool exhausted: asked for {format_size(self.requested_bytes)} "
            f"({_count(requested_slabs, 'slab')}) but only "
            f"{format_size(self.free_bytes)} ({_count(free_slabs, 'slab')}) is free"
        )

    @property
    def requested_bytes(self) -> int:
        return self.requested_slabs * self.slab_size

    @property
    def free_bytes(self) -> int:
        return self.free_slabs * self.slab_size


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def check_slab_size(slab_size: int) -> int:
    """Return ``slab_size`` if it is a power of two of at least 2 MiB.

    Raises ValueError otherwise.
    """
    if slab_size < MIN_SLAB_SIZE or slab_size & (slab_size - 1):
        raise ValueError(
            f"slab size must be a power of two of at least "
            f"{format_size(MIN_SLAB_SIZE)} (like 2M, 16M, 64M), got {slab_size} bytes"
        )
    return slab_size


class SlabAllocator:
    """Hands out and takes back slab indices of an arena of ``total_slabs``.

    Not thread safe: the master process uses it from its single asyncio thread.
    """

    def __init__(self, total_slabs: int, slab_size: int = DEFAULT_SLAB_SIZE) -> None:
        if total_slabs < 1:
            raise ValueError(f"an arena needs at least one slab, got {total_slabs}")
        self._slab_size = check_slab_size(slab_size)
        self._total = total_slabs
        # Free runs as (first_slab, length), sorted, never touching each other.
        self._runs: list[tuple[int, int]] = [(0, total_slabs)]
        self._free = total_slabs

    @property
    def total_slabs(self) -> int:
        return self._total

    @property
    def free_slabs(self) -> int:
        return self._free

    @property
    def used_slabs(self) -> int:
        return self._total - self._free

    @property
    def slab_size(self) -> int:
        return self._slab_size

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free slabs and return their indices in export order.

        One contiguous run is preferred, the smallest free run that fits, so
        large runs stay whole for later. When no run is long enough the slabs
        come from the longest runs first. Raises :class:`PoolExhaustedError` if
        fewer than ``count`` slabs are free.
        """
        if count < 1:
            raise ValueError(f"slab count must be at least 1, got {count}")
        if count > self._free:
            raise PoolExhaustedError(count, self._free, self._slab_size)

        fitting = [run for run in self._runs if run[1] >= count]
        if fitting:
            start, _ = min(fitting, key=lambda run: run[1])
            pieces = [(start, count)]
        else:
            pieces = []
            wanted = count
            for start, length in sorted(self._runs, key=lambda run: -run[1]):
                taken = min(length, wanted)
                pieces.append((start, taken))
                wanted -= taken
                if not wanted:
                    break

        slabs: list[int] = []
        for start, length in pieces:
            self._take(start, length)
            slabs.extend(range(start, start + length))
        log.debug(
            "slabs allocated count=%d pieces=%d free=%d", count, len(pieces), self._free
        )
        return slabs

    def free(self, slabs: Iterable[int]) -> None:
        """Return slabs to the pool.

        Raises ValueError, changing nothing, if any slab is out of range, listed
        twice, or not currently allocated.
        """
        ordered = sorted(slabs)
        for index, slab in enumerate(ordered):
            if not 0 <= slab < self._total:
                raise ValueError(
                    f"slab {slab} does not exist (the arena has {self._total})"
                )
            if index and ordered[index - 1] == slab:
                raise ValueError(f"slab {slab} is listed twice")
            if self._is_free(slab):
                raise ValueError(f"slab {slab} is not allocated (double free?)")
        for start, length in _consecutive(ordered):
            self._give_back(start, length)
        log.debug("slabs freed count=%d free=%d", len(ordered), self._free)

    def _run_at_or_before(self, slab: int) -> int:
        """Index in ``_runs`` of the last run starting at or before ``slab``."""
        return bisect.bisect_right(self._runs, slab, key=lambda run: run[0]) - 1

    def _is_free(self, slab: int) -> bool:
        index = self._run_at_or_before(slab)
        if index < 0:
            return False
        start, length = self._runs[index]
        return slab < start + length

    def _take(self, start: int, count: int) -> None:
        """Remove the first ``count`` slabs of the free run beginning at ``start``."""
        index = self._run_at_or_before(start)
        run_start, length = self._runs[index]
        assert run_start == start and length >= count
        if length == count:
            del self._runs[index]
        else:
            self._runs[index] = (start + count, length - count)
        self._free -= count

    def _give_back(self, start: int, count: int) -> None:
        """Insert a free run, merging it with the runs it touches."""
        index = self._run_at_or_before(start) + 1
        end = start + count
        if index < len(self._runs) and self._runs[index][0] == end:
            end += self._runs[index][1]
            del self._runs[index]
        if index > 0:
            before_start, before_length = self._runs[index - 1]
            if before_start + before_length == start:
                start = before_start
                index -= 1
                del self._runs[index]
        self._runs.insert(index, (start, end - start))
        self._free += count


def _consecutive(slabs: Iterable[int]) -> list[tuple[int, int]]:
    """Group slab indices into (first, count) runs, keeping their order."""
    runs: list[tuple[int, int]] = []
    for slab in slabs:
        if runs and runs[-1][0] + runs[-1][1] == slab:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slab, 1))
    return runs


def slab_runs(slabs: list[int], slab_size: int) -> list[tuple[int, int]]:
    """Turn an export's slab list into (byte_offset, byte_length) runs of the arena.

    Neighbouring slabs that follow each other in the list become one run; the
    export's order is kept, so ``[3, 4, 1]`` gives two runs, slabs 3-4 then 1.
    """
    if any(slab < 0 for slab in slabs):
        raise ValueError(f"slab indices must not be negative: {slabs}")
    return [
        (first * slab_size, count * slab_size) for first, count in _consecutive(slabs)
    ]


def parse_size(text: str) -> int:
    """Parse a size like "4096", "512M", "64MiB", "1.5G" or "16 MiB" into bytes.

    Units are powers of 1024 whether written K, KB or KiB (upper or lower case).
    Raises ValueError with a message fit for an operator.
    """
    match = _SIZE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: size must be like 512M, 4G or a byte count"
        )
    unit = (match["unit"] or "").upper()
    exponent = " KMGTPE".index(unit) if unit else 0
    value = Fraction(match["number"]) * 1024**exponent
    if value.denominator != 1:
        raise ValueError(f"invalid size {text!r}: it is not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    """Render a byte count with IEC units: 16777216 -> "16 MiB", 1536 -> "1.5 KiB"."""
    if size < 0:
        return "-" + format_size(-size)
    exponent = 0
    while exponent + 1 < len(_IEC_UNITS) and size >= 1024 ** (exponent + 1):
        exponent += 1
    unit = 1024**exponent
    if size % unit == 0:
        return f"{size // unit} {_IEC_UNITS[exponent]}"
    number = f"{size / unit:.2f}".rstrip("0").rstrip(".")
    return f"{number} {_IEC_UNITS[exponent]}"
