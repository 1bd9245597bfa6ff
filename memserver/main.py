"""Run a memserver in the foreground until SIGTERM or SIGINT.

systemd-friendly: logs go to stderr, SIGTERM stops cleanly (clients are
disconnected, workers exit, the arena is released), and when ``NOTIFY_SOCKET``
is set the daemon reports READY=1 and STOPPING=1 (``Type=notify``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

from memserver import __version__
from memserver.arena import ArenaError
from memserver.control import start_control
from memserver.daemon import Memserver, MemserverConfig, MemserverError
from memserver.slabs import format_size

log = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def notify_systemd(state: str) -> None:
    """Tell systemd about our state when it asked (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd socket=%s error=%s", address, e)


async def serve(config: MemserverConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    memserver = Memserver(config)
    await memserver.start()
    try:
        runner, control = await start_control(memserver, *config.control)
    except MemserverError:
        await memserver.stop()
        raise
    health = memserver.health()
    log.info(
        "memserver ready nbd=%s:%d unix=%s control=http://%s:%d size=%s "
        "slabs=%d slab_size=%s workers=%d locked=%s huge_pages=%r zone=%s",
        *memserver.listen_address,
        config.unix_socket or "-",
        *control,
        format_size(health["arena"]["bytes"]),
        health["slabs"]["total"],
        format_size(config.slab_size),
        config.workers,
        health["arena"]["locked"],
        health["arena"]["huge_pages"],
        config.zone or "-",
    )
    notify_systemd("READY=1\nSTATUS=serving")

    await stop.wait()
    log.info("memserver stopping exports=%d", len(memserver.exports))
    notify_systemd("STOPPING=1")
    await runner.cleanup()
    await memserver.stop()
    log.info("memserver stopped")


def run(config: MemserverConfig) -> int:
    """Run until stopped; return the process exit status."""
    setup_logging(config.log_level)
    log.info(
        "memserver starting version=%s pid=%d size=%d",
        __version__,
        os.getpid(),
        config.size,
    )
    try:
        asyncio.run(serve(config))
    except (ArenaError, MemserverError) as e:
        log.error("%s", e)
        return 1
    return 0
