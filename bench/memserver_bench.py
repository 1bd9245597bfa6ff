#!/usr/bin/env python3
"""Benchmark the memserver against ``nbdkit memory`` with fio's nbd engine.

Usage (from the repository, after scripts/setup.sh)::

    .venv/bin/python bench/memserver_bench.py [--seconds 10] [--rounds 3]

Both servers run side by side in the same run, over TCP and over a unix
socket, and every fio job runs against each of them in alternation, ``rounds``
times; the table shows medians.  Each export is first written end to end so
that neither server answers reads from holes.  This is a benchmark, not a
test: it asserts nothing and prints a table (and ``--json`` for scripts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.memserver_process import MemserverProcess, client_env

EXPORT_SIZE = "512M"


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int
    connections: int = 1


JOBS = (
    Job("4K randread QD1", "randread", "4k", 1),
    Job("4K randwrite QD1", "randwrite", "4k", 1),
    Job("4K randread QD32", "randread", "4k", 32),
    Job("4K randwrite QD32", "randwrite", "4k", 32),
    Job("1M read QD8", "read", "1m", 8),
    Job("1M write QD8", "write", "1m", 8),
    # Several connections: what spreading them over worker processes buys.
    Job("4K randread 4xQD8", "randread", "4k", 8, connections=4),
    Job("4K randwrite 4xQD8", "randwrite", "4k", 8, connections=4),
)


@dataclass
class Result:
    iops: float
    mbps: float
    p50_us: float
    p99_us: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_fio(uri: str, job: Job, seconds: float) -> Result:
    argv = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--numjobs={job.connections}",
        "--group_reporting",
        f"--size={EXPORT_SIZE}",
        f"--runtime={seconds}",
        "--time_based",
        "--ramp_time=1",
        "--output-format=json",
    ]
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, env=client_env()
    )
    data = json.loads(out.stdout[out.stdout.index("{") :])
    side = data["jobs"][0]["read" if "read" in job.rw else "write"]
    percentiles = side["clat_ns"].get("percentile", {})
    return Result(
        iops=side["iops"],
        mbps=side["bw_bytes"] / 1e6,
        p50_us=percentiles.get("50.000000", 0) / 1000,
        p99_us=percentiles.get("99.000000", 0) / 1000,
    )


def fill(uri: str) -> None:
    """Write the whole export once so reads hit real memory on both servers."""
    subprocess.run(
        [
            "fio",
            "--name=fill",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=write",
            "--bs=1m",
            "--iodepth=8",
            f"--size={EXPORT_SIZE}",
            "--output-format=terse",
        ],
        check=True,
        capture_output=True,
        env=client_env(),
    )


def start_nbdkit(tmp: Path, transport: str) -> tuple[subprocess.Popen[bytes], str]:
    if transport == "tcp":
        port = free_port()
        listen = ["-i", "127.0.0.1", "-p", str(port)]
        uri = f"nbd://127.0.0.1:{port}/"
    else:
        path = tmp / "nbdkit.sock"
        listen = ["-U", str(path)]
        uri = f"nbd+unix:///?socket={path}"
    process = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", *listen, "memory", EXPORT_SIZE],
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        probe = subprocess.run(
            ["nbdinfo", "--size", uri], capture_output=True, env=client_env()
        )
        if probe.returncode == 0:
            return process, uri
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"nbdkit did not start on {uri}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--transports", default="tcp,unix")
    parser.add_argument(
        "--only", default="", help="run only jobs whose name contains this"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, no table")
    args = parser.parse_args()
    for tool in ("fio", "nbdkit", "nbdinfo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run scripts/setup.sh first")

    rows = []
    with tempfile.TemporaryDirectory(prefix="rampool-bench-") as tmpdir:
        tmp = Path(tmpdir)
        memserver = MemserverProcess(tmp, size="1G", workers=args.workers).start()
        try:
            export = memserver.create_export(EXPORT_SIZE, "bench")
            for transport in args.transports.split(","):
                ours = (
                    export["uri"]
                    if transport == "tcp"
                    else memserver.unix_uri(export["name"])
                )
                nbdkit, theirs = start_nbdkit(tmp, transport)
                try:
                    fill(ours)
                    fill(theirs)
                    for job in (j for j in JOBS if args.only in j.name):
                        samples: dict[str, list[Result]] = {"ours": [], "nbdkit": []}
                        for _ in range(args.rounds):
                            samples["ours"].append(run_fio(ours, job, args.seconds))
                            samples["nbdkit"].append(run_fio(theirs, job, args.seconds))
                        rows.append(summarize(job, transport, samples))
                        if not args.json:
                            print_row(rows[-1], header=len(rows) == 1)
                finally:
                    nbdkit.terminate()
                    nbdkit.wait()
        finally:
            memserver.stop()
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def summarize(job: Job, transport: str, samples: dict[str, list[Result]]) -> dict:
    def median(server: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in samples[server])

    row: dict[str, object] = {"job": job.name, "transport": transport}
    for server in ("ours", "nbdkit"):
        for field in ("iops", "mbps", "p50_us", "p99_us"):
            row[f"{server}_{field}"] = round(median(server, field), 1)
    theirs = median("nbdkit", "iops")
    row["ratio"] = round(median("ours", "iops") / theirs, 2) if theirs else None
    return row


COLUMNS = (
    ("job", "{:<18}"),
    ("transport", "{:<5}"),
    ("ours_iops", "{:>9.0f}"),
    ("nbdkit_iops", "{:>9.0f}"),
    ("ratio", "{:>5.2f}"),
    ("ours_mbps", "{:>7.0f}"),
    ("nbdkit_mbps", "{:>7.0f}"),
    ("ours_p50_us", "{:>7.1f}"),
    ("nbdkit_p50_us", "{:>7.1f}"),
    ("ours_p99_us", "{:>7.1f}"),
    ("nbdkit_p99_us", "{:>7.1f}"),
)
HEADINGS = (
    "job",
    "via",
    "IOPS us",
    "nbdkit",
    "ratio",
    "MB/s us",
    "nbdkit",
    "p50 us",
    "nbdkit",
    "p99 us",
    "nbdkit",
)


def print_row(row: dict, *, header: bool) -> None:
    if header:
        widths = [len(fmt.format(row[key])) for key, fmt in COLUMNS]
        print(" | ".join(h.rjust(w) for h, w in zip(HEADINGS, widths, strict=True)))
    print(" | ".join(fmt.format(row[key]) for key, fmt in COLUMNS), flush=True)


if __name__ == "__main__":
    sys.exit(main())
