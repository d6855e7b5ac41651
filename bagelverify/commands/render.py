"""Output shared by the commands: rich on a terminal, plain text when piped, silent when quiet.

Tables and styled lines go to stdout through :class:`Printer`; progress bars go to stderr and
only when stderr is a terminal (:func:`byte_progress`), so piped stdout and ``--json`` output
never contain control codes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ..cli import SCHEMA_VERSION, json_envelope
from ..strict_json import dumps_json


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal that may receive control codes."""
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def human_bytes(count: int) -> str:
    """``16_106_127_360`` -> ``"16.1 GB"`` (decimal units, as file managers and the design use)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def print_json(
    document: dict[str, Any], stream: TextIO | None = None, *, ascii_only: bool = False
) -> None:
    """A command's ``--json`` fields: under :func:`bagelverify.cli.main` they are handed to the
    run's :class:`~bagelverify.cli.JsonEnvelope`, which prints them after the envelope
    (``schema_version``, ``command``, ``ok``, ``exit_code``, ``seconds``) once the command
    returns; a command called directly prints them after ``schema_version`` and ``command``.
    Written by :func:`bagelverify.strict_json.dumps_json`: valid JSON in the stream's encoding
    whatever it holds (a non-finite number as ``"nan"``/``"inf"``/``"-inf"``, a path's
    undecodable byte as its ``\\udcXX`` escape); ``ascii_only`` escapes every non-ASCII
    character."""
    if "command" not in document:
        raise ValueError("a --json document names its command")
    envelope = json_envelope()
    if envelope is not None and stream is None:
        envelope.hold(document, ascii_only=ascii_only)
        return
    stream = stream or sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    out = {"schema_version": SCHEMA_VERSION, **document}
    print(dumps_json(out, encoding=encoding, ascii_only=ascii_only), file=stream)


def _encodes(character: str, encoding: str) -> bool:
    try:
        character.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str, encoding: str) -> str:
    """``text`` with what ``encoding`` cannot write escaped: a path's undecodable byte
    (``surrogateescape``'s ``\\udcXX``) as ``\\xXX``, any other character as its ``\\u``
    escape, so a folder name holding a byte that is not UTF-8 prints instead of failing."""
    if _encodes(text, encoding):
        return text
    return "".join(
        character
        if _encodes(character, encoding)
        else f"\\x{ord(character) - 0xDC00:02x}"
        if 0xDC80 <= ord(character) <= 0xDCFF
        else ascii(character)[1:-1]
        for character in text
    )


@dataclass(frozen=True)
class Column:
    """A table column: its header and whether its cells are right-aligned (numbers)."""

    header: str
    numeric: bool = False


class Printer:
    """Writes a command's human-readable output: rich when stdout is a terminal, else plain."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.rich = is_terminal(self.stream)
        self._console: Any = None
        if self.rich and not quiet:
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False)

    def line(self, text: str = "", style: str | None = None) -> None:
        """One line of text (``style`` is a rich style, ignored in plain mode); what the
        stream's encoding cannot write is escaped (:func:`printable`)."""
        if self.quiet:
            return
        text = printable(text, getattr(self.stream, "encoding", None) or "utf-8")
        if self._console is not None:
            from rich.text import Text

            self._console.print(Text(text, style=style or ""))
        else:
            print(text, file=self.stream)

    def heading(self, text: str) -> None:
        """A section heading preceded by a blank line."""
        self.line()
        self.line(text, style="bold")

    def fields(self, pairs: Sequence[tuple[str, str]], indent: int = 2) -> None:
        """``name  value`` lines with the names padded to one width."""
        width = max((len(name) for name, _ in pairs), default=0)
        for name, value in pairs:
            self.line(" " * indent + f"{name:<{width}}  {value}")

    def table(self, title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
        """A table: rich box drawing on a terminal, space-aligned columns otherwise."""
        if self.quiet:
            return
        if self._console is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left", title_style="bold")
            for column in columns:
                table.add_column(column.header, justify="right" if column.numeric else "left")
            for row in rows:
                table.add_row(*row)
            self.line()
            self._console.print(table)
            return
        self.heading(title)
        cells = [[c.header for c in columns], *[list(row) for row in rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        for row in cells:
            parts = [
                cell.rjust(width) if column.numeric else cell.ljust(width)
                for cell, width, column in zip(row, widths, columns, strict=True)
            ]
            self.line(("  " + "  ".join(parts)).rstrip())


@contextlib.contextmanager
def byte_progress(total: int, description: str, *, quiet: bool) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(nbytes)``; draws a bytes progress bar on stderr when it is a terminal."""
    if quiet or not is_terminal(sys.stderr):
        yield lambda _: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda nbytes: progress.advance(task, nbytes)


def _ignore(_: str | None = None, steps: int = 1) -> None:
    """Progress nobody sees."""


@contextlib.contextmanager
def step_progress(
    total: int, description: str, *, quiet: bool
) -> Iterator[Callable[[str | None, int], None]]:
    """Yield ``advance(description=None, steps=1)``: steps done (and, if given, the new
    description); draws a step counter with elapsed time on stderr when it is a terminal,
    nothing otherwise."""
    if quiet or not is_terminal(sys.stderr):
        yield _ignore
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task(description, total=total)

        def advance(text: str | None = None, steps: int = 1) -> None:
            # a new description is drawn at once, not at the next 10 Hz refresh: a phase shorter
            # than a refresh would otherwise never be shown
            changed = text is not None and text != progress.tasks[0].description
            progress.update(task, advance=steps, description=text, refresh=changed)

        yield advance


@contextlib.contextmanager
def activity(description: str, *, quiet: bool) -> Iterator[None]:
    """A spinner with elapsed time on stderr while the block runs, for work that reports no
    progress of its own; only when stderr is a terminal."""
    if quiet or not is_terminal(sys.stderr):
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as progress:
        progress.add_task(description, total=None)
        yield
