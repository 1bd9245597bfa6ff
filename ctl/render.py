"""How the command line shows results: rich tables for people, JSON for scripts,
and errors on stderr with a non-zero exit."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from ctl.memserver_client import MemserverAPIError
from ctl.registry import RegistryError
from memserver.slabs import format_size

stdout = Console()
stderr = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    stderr.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the errors an operator can act on into a message and exit 1."""
    from ctl.provision import ProvisionError

    try:
        yield
    except (RegistryError, MemserverAPIError, ProvisionError, ValueError) as e:
        fail(str(e))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    stdout.print(table)


def size(value: int) -> str:
    return format_size(value)
