"""Fixtures shared by the test suite."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.memserver_process import MemserverProcess

# Clients the tests drive; a missing one fails the run instead of skipping.
REQUIRED_TOOLS = ("nbdinfo", "nbdsh", "nbdcopy", "qemu-io", "qemu-img", "fio", "nbdkit")


@pytest.fixture(scope="session", autouse=True)
def _required_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"missing tools: {', '.join(missing)}; run scripts/test.sh, which "
            "installs them",
            pytrace=False,
        )


@pytest.fixture
def memserver(tmp_path: Path) -> Iterator[MemserverProcess]:
    """A running memserver with 256 MiB and two workers, stopped afterwards.

    The test fails if the daemon does not stop cleanly with status 0.
    """
    server = MemserverProcess(tmp_path).start()
    try:
        yield server
    finally:
        status = server.stop()
    assert status == 0, f"memserver exited with {status}:\n{server.log}"
