"""The arena and export mappings, on real memfds, checked against the kernel's view.

What the kernel reports in /proc/self/smaps (resident, locked, flags) and what a
plain pread(2) of the memfd returns are the independent witnesses here.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memserver import arena as arena_module
from memserver import libc
from memserver.arena import Arena, ArenaError, ExportMapping, _touch_pages
from memserver.slabs import slab_runs

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SLAB = 2 * MiB
KiB = 1024

_VMA_HEADER = re.compile(r"([0-9a-f]+)-([0-9a-f]+) ")


class Smaps:
    """The kernel's accounting for the mappings inside one address range."""

    def __init__(self, start: int, end: int) -> None:
        self.vmas = 0
        self.fields: dict[str, int] = {}
        self.flags: list[set[str]] = []
        inside = False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            header = _VMA_HEADER.match(line)
            if header:
                low, high = int(header[1], 16), int(header[2], 16)
                inside = start <= low and high <= end
                self.vmas += inside
            elif inside and line.startswith("VmFlags:"):
                self.flags.append(set(line.split()[1:]))
            elif inside:
                name, _, rest = line.partition(":")
                words = rest.split()
                if words and words[0].isdigit():
                    self.fields[name] = self.fields.get(name, 0) + int(words[0])

    def bytes(self, field: str) -> int:
        return self.fields[field] * KiB


def locked_bytes() -> int:
    """This process's locked address space (VmLck), in bytes."""
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^VmLck:\s+(\d+) kB$", status, re.MULTILINE)
    assert match is not None, status
    return int(match[1]) * KiB


def pattern(seed: int, length: int) -> bytes:
    """Deterministic bytes that differ for every seed and every position."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    return (block * (length // len(block) + 1))[:length]


def test_locked_arena_is_resident_locked_and_not_dumped() -> None:
    with Arena.create(32 * MiB, lock=True) as arena:
        assert arena.locked is True
        assert arena.size == 32 * MiB
        assert arena.address % libc.PAGE_SIZE == 0
        smaps = Smaps(arena.address, arena.address + arena.size)
        assert smaps.vmas == 1
        assert smaps.bytes("Locked") == 32 * MiB
        assert smaps.bytes("Rss") == 32 * MiB
        assert {"sh", "wr", "dd", "lo"} <= smaps.flags[0]
        # The memfd's own blocks are allocated: the whole arena is backed by RAM.
        assert os.fstat(arena.fd).st_blocks * 512 == 32 * MiB
        assert os.fstat(arena.fd).st_size == 32 * MiB
        assert "memfd:rampool-arena" in os.readlink(f"/proc/self/fd/{arena.fd}")
        # Close-on-exec: only processes given the fd with pass_fds get it.
        assert fcntl.fcntl(arena.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        locked = locked_bytes()
        libc.munlock(arena.address, arena.size)
        assert locked_bytes() == locked - 32 * MiB


def test_unlocked_arena_is_populated_but_not_locked() -> None:
    with Arena.create(16 * MiB, lock=False, name="unlocked") as arena:
        assert arena.locked is False
        smaps = Smaps(arena.address, arena.address + arena.size)
        assert smaps.bytes("Locked") == 0
        assert smaps.bytes("Rss") == 16 * MiB
        assert "lo" not in smaps.flags[0]
        assert "dd" in smaps.flags[0]
        assert os.fstat(arena.fd).st_blocks * 512 == 16 * MiB
        assert "memfd:unlocked" in os.readlink(f"/proc/self/fd/{arena.fd}")


def test_huge_pages_state_matches_the_kernel() -> None:
    setting_file = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    active = re.search(r"\[(\w+)\]", setting_file.read_text())
    assert active is not None
    with Arena.create(8 * MiB) as arena:
        assert f"shmem_enabled={active[1]}" in arena.huge_pages
        smaps = Smaps(arena.address, arena.address + arena.size)
        # THPeligible is the kernel's own verdict for this mapping.
        eligible = smaps.fields["THPeligible"] > 0
        assert eligible == arena.huge_pages.startswith("enabled"), arena.huge_pages


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        (
            "[always] within_size advise never deny force\n",
            "enabled (shmem_enabled=always)",
        ),
        (
            "always within_size [advise] never deny force\n",
            "enabled (shmem_enabled=advise)",
        ),
        (
            "always within_size advise [never] deny force\n",
            "disabled (shmem_enabled=never;",
        ),
        (
            "always within_size advise never [deny] force\n",
            "disabled (shmem_enabled=deny;",
        ),
        (None, "disabled (this kernel has no"),
    ],
)
def test_huge_pages_state_follows_each_shmem_setting(
    contents: str | None,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The host's real setting cannot be changed under other users' feet, so the
    # sysfs file is replaced by a copy holding each possible value.
    setting = tmp_path / "shmem_enabled"
    if contents is not None:
        setting.write_text(contents)
    monkeypatch.setattr(arena_module, "SHMEM_THP_SETTING", setting)
    with Arena.create(4 * MiB, lock=False) as arena:
        assert arena.huge_pages.startswith(expected), arena.huge_pages
        flags = Smaps(arena.address, arena.address + arena.size).flags[0]
        # MADV_HUGEPAGE is asked for whenever the kernel has shmem THP at all.
        assert ("hg" in flags) == (contents is not None)


def test_view_writes_reach_the_memfd_and_zero_clears_exactly_its_range() -> None:
    with Arena.create(8 * MiB, lock=False) as arena:
        data = pattern(1, 4 * MiB)
        view = arena.view(2 * MiB, 4 * MiB)
        assert not view.readonly
        view[:] = data
        view.release()
        assert os.pread(arena.fd, 4 * MiB, 2 * MiB) == data

        arena.zero(2 * MiB + 3, 10_000)
        expected = data[:3] + bytes(10_000) + data[10_003:]
        assert os.pread(arena.fd, 4 * MiB, 2 * MiB) == expected
        assert os.pread(arena.fd, 2 * MiB, 0) == bytes(2 * MiB)


def test_libc_errors_carry_errno_and_name_the_call() -> None:
    with pytest.raises(OSError) as bad_fd:
        libc.mmap(libc.PAGE_SIZE, libc.PROT_READ, libc.MAP_SHARED, fd=-1)
    assert bad_fd.value.errno == errno.EBADF
    assert "mmap(" in str(bad_fd.value) and "fd=-1" in str(bad_fd.value)
    with pytest.raises(OSError) as unaligned:
        libc.munmap(libc.PAGE_SIZE + 1, libc.PAGE_SIZE)
    assert unaligned.value.errno == errno.EINVAL
    assert "munmap(" in str(unaligned.value)
    # prctl is variadic in C; both the result and an error must come through.
    pr_get_dumpable, pr_set_dumpable = 3, 4
    assert libc.prctl(pr_get_dumpable) in (0, 1, 2)
    with pytest.raises(OSError) as bad_option:
        libc.prctl(pr_set_dumpable, 7)
    assert bad_option.value.errno == errno.EINVAL
    assert "prctl(option=4" in str(bad_option.value)


def test_page_touch_fallback_faults_in_every_page() -> None:
    # The fallback for kernels without MADV_POPULATE_WRITE; this one has it, so
    # the fallback is driven directly on a fresh memfd.
    size = 8 * MiB
    fd = libc.memfd_create("touch-test")
    try:
        os.ftruncate(fd, size)
        address = libc.mmap(size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd)
        try:
            assert Smaps(address, address + size).bytes("Rss") == 0
            view = libc.memory_view(address, size)
            _touch_pages(view)
            view.release()
            assert Smaps(address, address + size).bytes("Rss") == size
            assert os.fstat(fd).st_blocks * 512 == size
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("offset", "length"), [(-1, 10), (0, -1), (8 * MiB - 4, 5), (8 * MiB + 1, 0)]
)
def test_view_and_zero_refuse_ranges_outside_the_arena(
    offset: int, length: int
) -> None:
    with Arena.create(8 * MiB, lock=False) as arena:
        with pytest.raises(ValueError, match="outside the arena of 8388608 bytes"):
            arena.view(offset, length)
        with pytest.raises(ValueError, match="outside the arena"):
            arena.zero(offset, length)


@pytest.mark.parametrize("size", [0, -4096, 4096 + 1])
def test_create_refuses_sizes_that_are_not_whole_pages(size: int) -> None:
    with pytest.raises(ArenaError, match="positive multiple of 4096 bytes"):
        Arena.create(size)


def test_close_refuses_while_views_live_then_is_idempotent() -> None:
    arena = Arena.create(4 * MiB, lock=False)
    view = arena.view(100, 10)
    view[:] = b"0123456789"
    with pytest.raises(ArenaError, match="views of it are still alive"):
        arena.close()
    # The refused close left the arena fully usable.
    assert bytes(view) == b"0123456789"
    assert bytes(arena.view(100, 10)) == b"0123456789"
    del view
    address, size = arena.address, arena.size
    arena.close()
    assert Smaps(address, address + size).vmas == 0
    with pytest.raises(OSError) as fd_error:
        os.fstat(arena.fd)
    assert fd_error.value.errno == errno.EBADF
    arena.close()
    with pytest.raises(ArenaError, match="closed"):
        arena.view(0, 1)
    with pytest.raises(ArenaError, match="closed"):
        arena.zero(0, 1)


def test_export_maps_scattered_slabs_as_one_contiguous_view() -> None:
    with Arena.create(4 * SLAB, lock=False) as arena:
        for slab in range(4):
            arena.view(slab * SLAB, SLAB)[:] = pattern(slab, SLAB)

        runs = slab_runs([3, 1], SLAB)
        assert runs == [(3 * SLAB, SLAB), (1 * SLAB, SLAB)]
        with ExportMapping(arena.fd, runs, lock=False) as export:
            assert export.size == 2 * SLAB
            assert len(export.view) == 2 * SLAB
            assert export.view[:SLAB] == pattern(3, SLAB)
            assert export.view[SLAB:] == pattern(1, SLAB)

            # One write crossing the seam lands in both slabs of the arena.
            export.view[SLAB - 4 : SLAB + 4] = b"ABCDEFGH"
            assert os.pread(arena.fd, 4, 4 * SLAB - 4) == b"ABCD"
            assert os.pread(arena.fd, 4, 1 * SLAB) == b"EFGH"

            smaps = Smaps(export.address, export.address + export.size)
            assert smaps.vmas == 2
            assert smaps.bytes("Rss") == 2 * SLAB
            assert smaps.bytes("Locked") == 0
            assert all({"sh", "wr", "dd"} <= flags for flags in smaps.flags)
        assert Smaps(export.address, export.address + export.size).vmas == 0


def test_locked_export_merges_adjacent_slabs_and_pins_them() -> None:
    with Arena.create(4 * SLAB, lock=False) as arena:
        arena.view(0, 4 * SLAB)[:] = pattern(7, 4 * SLAB)
        runs = slab_runs([1, 2], SLAB)
        assert runs == [(SLAB, 2 * SLAB)]
        locked_before = locked_bytes()
        with ExportMapping(arena.fd, runs, lock=True) as export:
            assert export.locked is True
            assert export.view == pattern(7, 4 * SLAB)[SLAB : 3 * SLAB]
            smaps = Smaps(export.address, export.address + export.size)
            assert smaps.vmas == 1
            assert "lo" in smaps.flags[0]
            assert smaps.bytes("Rss") == 2 * SLAB
            # smaps' Locked is a proportional share, halved here because the
            # arena maps the same pages; VmLck counts locked bytes of address space.
            assert locked_bytes() == locked_before + 2 * SLAB
        assert locked_bytes() == locked_before


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([], "at least one run"),
        ([(100, SLAB)], "aligned"),
        ([(0, 100)], "aligned"),
        ([(0, 0)], "positive"),
        ([(3 * SLAB, 2 * SLAB)], "outside the arena of 8388608 bytes"),
        ([(0, SLAB), (-SLAB, SLAB)], "outside the arena"),
    ],
)
def test_export_refuses_bad_runs(runs: list[tuple[int, int]], message: str) -> None:
    with (
        Arena.create(4 * SLAB, lock=False) as arena,
        pytest.raises(ArenaError, match=message),
    ):
        ExportMapping(arena.fd, runs, lock=False)


def test_export_close_refuses_while_slices_live() -> None:
    with Arena.create(SLAB, lock=False) as arena:
        export = ExportMapping(arena.fd, [(0, SLAB)], lock=False)
        piece = export.view[10:20]
        with pytest.raises(ArenaError, match="still alive"):
            export.close()
        piece[:] = b"x" * 10
        assert os.pread(arena.fd, 10, 10) == b"x" * 10
        piece.release()
        export.close()
        export.close()
        with pytest.raises(ArenaError, match="closed"):
            export.view  # noqa: B018 - the property access itself must fail


CHILD_EXPORT_SCRIPT = """
import hashlib, json, sys
from memserver.arena import ExportMapping
fd, runs = int(sys.argv[1]), [tuple(run) for run in json.loads(sys.argv[2])]
with ExportMapping(fd, runs, lock=True) as export:
    print(hashlib.sha256(export.view).hexdigest(), export.size, flush=True)
    export.view[-5:] = b"child"
"""


def test_another_process_shares_the_arena_through_the_passed_fd() -> None:
    with Arena.create(4 * SLAB, lock=True) as arena:
        for slab in range(4):
            arena.view(slab * SLAB, SLAB)[:] = pattern(10 + slab, SLAB)
        runs = slab_runs([2, 0], SLAB)
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD_EXPORT_SCRIPT,
                str(arena.fd),
                json.dumps(runs),
            ],
            pass_fds=[arena.fd],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode == 0, child.stderr
        expected = hashlib.sha256(pattern(12, SLAB) + pattern(10, SLAB)).hexdigest()
        assert child.stdout.split() == [expected, str(2 * SLAB)]
        # The child's last five bytes are the end of slab 0 in the arena.
        assert bytes(arena.view(SLAB - 5, 5)) == b"child"
        assert bytes(arena.view(3 * SLAB - 5, 5)) == pattern(12, SLAB)[-5:]


CHILD_LOCK_SCRIPT = """
import json, os, sys
from memserver.arena import Arena, ArenaLockError, ExportMapping
report = {}
fds = sorted(os.listdir("/proc/self/fd"))
try:
    Arena.create(16 << 20, lock=True)
except ArenaLockError as exc:
    report["arena"] = [exc.errno, str(exc)]
# The failed attempt must leave neither its descriptor nor its mapping behind.
report["leaked_fds"] = sorted(set(os.listdir("/proc/self/fd")) - set(fds))
report["leaked_maps"] = open("/proc/self/maps").read().count("rampool-arena")
with Arena.create(16 << 20, lock=False) as arena:
    report["unlocked"] = arena.locked
    try:
        ExportMapping(arena.fd, [(0, 4 << 20)], lock=True)
    except ArenaLockError as exc:
        report["export"] = [exc.errno, str(exc)]
print(json.dumps(report))
"""

# As root, mlock ignores RLIMIT_MEMLOCK; these run the child without that power.
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ROOT_WITHOUT_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


@pytest.mark.parametrize(
    ("drop_privileges", "limit", "errno_name", "shown_limit"),
    [
        (NOBODY, 65536, "ENOMEM", "soft=64 KiB hard=64 KiB"),
        (ROOT_WITHOUT_CAPS, 0, "EPERM", "soft=0 B hard=0 B"),
    ],
    ids=["nobody-64KiB", "root-without-caps-0"],
)
def test_refused_mlock_tells_the_operator_what_to_do(
    drop_privileges: list[str], limit: int, errno_name: str, shown_limit: str
) -> None:
    command = [
        "prlimit",
        f"--memlock={limit}:{limit}",
        *drop_privileges,
        sys.executable,
        "-c",
        CHILD_LOCK_SCRIPT,
    ]
    child = subprocess.run(
        command,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    arena_errno, arena_message = report["arena"]
    assert arena_errno == getattr(errno, errno_name)
    for advice in (
        "cannot lock the arena (16 MiB)",
        "RLIMIT_MEMLOCK",
        shown_limit,
        "CAP_IPC_LOCK",
        "LimitMEMLOCK=infinity",
        "--no-mlock",
    ):
        assert advice in arena_message, arena_message
    assert report["leaked_fds"] == []
    assert report["leaked_maps"] == 0
    # Without mlock the same unprivileged process still gets a working arena.
    assert report["unlocked"] is False
    export_errno, export_message = report["export"]
    assert export_errno == getattr(errno, errno_name)
    assert "cannot lock an export (4 MiB)" in export_message
    assert "--no-mlock" in export_message
