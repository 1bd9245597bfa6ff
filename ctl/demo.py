"""``rampool demo``: a memserver on loopback, an export, a real client's check.

What it shows today (the memserver): RAM contributed by a daemon, carved
into an export that any NBD client can use, and verified byte for byte by
libnbd's own tools.  Later work adds the pool: several memservers, a
replicated volume served through the plugin.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import typer

from ctl.localpool import LocalMemserver, LocalMemserverError

DEMO_EXPORT = 64 * 1024 * 1024


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DemoError(f"{name} is missing: run scripts/setup.sh, which installs it")
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(argv, capture_output=True, timeout=120)
    if result.returncode != 0:
        raise DemoError(
            f"{' '.join(argv)} failed ({result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result


def run_demo(keep: bool) -> None:
    nbdinfo, nbdcopy = _tool("nbdinfo"), _tool("nbdcopy")
    with tempfile.TemporaryDirectory(prefix="rampool-demo-") as tmpdir:
        tmp = Path(tmpdir)
        socket_path = str(tmp / "nbd.sock")
        typer.echo("1. starting a memserver with 256 MiB of locked RAM on loopback")
        memserver = LocalMemserver(size="256M", socket_path=socket_path).start()
        try:
            health = memserver.client.health()
            typer.echo(
                f"   ready: NBD on {memserver.nbd_address}, control API on "
                f"{memserver.control_url}, {health['workers']['running']} workers, "
                f"locked={health['arena']['locked']}"
            )
            typer.echo("2. creating a 64 MiB export through the control API")
            export = memserver.client.create_export(DEMO_EXPORT, "demo")
            uri = export["uri"]
            typer.echo(f"   export URI: {uri}")

            typer.echo("3. checking it with libnbd's nbdinfo and nbdcopy")
            info = _run([nbdinfo, uri]).stdout.decode()
            if f"export-size: {DEMO_EXPORT}" not in info:
                raise DemoError(f"nbdinfo reports an unexpected export:\n{info}")
            source = tmp / "random.img"
            source.write_bytes(os.urandom(DEMO_EXPORT))
            _run([nbdcopy, "--connections=4", str(source), uri])
            back = tmp / "back.img"
            _run([nbdcopy, uri, str(back)])
            sent = hashlib.sha256(source.read_bytes()).hexdigest()
            got = hashlib.sha256(back.read_bytes()).hexdigest()
            if sent != got:
                raise DemoError(f"data came back different: {sent} != {got}")
            typer.echo(f"   64 MiB written and read back intact (sha256 {sent[:16]}…)")

            typer.echo("4. use it from any NBD client, for example:")
            typer.echo(f"     nbdinfo {uri}")
            typer.echo(f"     qemu-io -f raw {uri} -c 'read -v 0 64'")
            host, port = memserver.nbd_address.rsplit(":", 1)
            typer.echo(
                f"     nbd-client {host} {port} /dev/nbd0 -N {export['name']} -b 4096"
            )
            typer.echo(f"     curl {memserver.control_url}/metrics")
            if keep:
                typer.echo("   serving until Ctrl-C")
                assert memserver.process is not None
                with contextlib.suppress(KeyboardInterrupt):
                    memserver.process.wait()
        finally:
            status = memserver.stop()
        if status != 0:
            raise DemoError(f"memserver exited with {status}:\n{memserver.log}")
        typer.echo("demo: OK (memserver stopped cleanly)")


def demo(keep: bool) -> None:
    try:
        run_demo(keep)
    except (DemoError, LocalMemserverError) as e:
        typer.echo(f"demo: FAILED: {e}", err=True)
        raise typer.Exit(1) from None
