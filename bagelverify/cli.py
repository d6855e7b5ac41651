"""Command line: ``bagelverify <command>`` and ``python -m bagelverify <command>``.

Each command lives in its own module, imported only when that command runs (so ``--help`` and
the torch-free commands start fast), which provides:

``EXAMPLE``
    an example invocation, shown at the end of ``--help``;
``configure(parser)``
    adds the command's own arguments;
``run(args) -> int``
    does the work and returns the exit code (0 clean, 1 problems found).

Conventions shared by every command: ``--json`` prints one JSON document on stdout, ``--quiet``
prints nothing but errors, and any error is one line on stderr (a traceback only with
``--debug``) whose exit code says what kind it was (:func:`exit_code_for`): 1 a problem found
in a checkpoint, 2 a usage error, 3 a failure of the system, 130 an interrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any, NoReturn

from .errors import (
    AliasError,
    AllocationError,
    ArgumentError,
    BagelError,
    IntegrationError,
    LossyCastError,
    PatternError,
    ShardSizeError,
    StageError,
    UnsupportedPlatformError,
)
from .stage import Stage, normalize_stage

#: Command name -> (module implementing it, one line for the command list), in list order.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": (
        "bagelverify.commands.inspect",
        "check a checkpoint folder from its headers alone (no tensor data is read)",
    ),
    "convert": (
        "bagelverify.commands.convert",
        "rewrite a checkpoint for a stage with HF or native keys (streaming), or to/from DCP",
    ),
    "diff": (
        "bagelverify.commands.diff",
        "compare two checkpoints: keys, shapes, dtypes, then values per key family (streaming)",
    ),
    "repair": (
        "bagelverify.commands.repair",
        "fill the keys a checkpoint lacks (e.g. a lost vision tower) from a base checkpoint",
    ),
    "compose": (
        "bagelverify.commands.compose",
        "compose a BAGEL initialisation from Qwen2 + SigLIP Hugging Face folders (streaming)",
    ),
    "lora": (
        "bagelverify.commands.lora",
        "check where a LoRA adapter binds (UND and GEN twins), or merge it into a checkpoint",
    ),
    "export": (
        "bagelverify.commands.export",
        "export an Automodel training checkpoint (step folder) to the released BAGEL layout",
    ),
    "verify": (
        "bagelverify.commands.verify",
        "prove properties of the key patterns for every string (disjoint, covering, digit-safe)",
    ),
    "bench": (
        "bagelverify.commands.bench",
        "benchmark the compiled key matcher against naive regex matching (a minute or more;"
        " --quick: seconds)",
    ),
    "demo": (
        "bagelverify.commands.demo",
        "build a small synthetic BAGEL checkpoint and run inspect, loads, round trips and proofs",
    ),
}

EXIT_OK = 0
"""Clean, identical, proved, done."""
EXIT_PROBLEMS = 1
"""Problems found in a checkpoint: ``inspect`` not clean, ``diff`` differs, a failed proof or
demo claim, or a command that refused its input checkpoint (a :class:`BagelError`)."""
EXIT_USAGE = 2
"""A usage error: bad arguments, a path that does not exist, an output that exists without
``--force``, a flag that is needed (``--allow-lossy``)."""
EXIT_FAILED = 3
"""The system failed the run: a file system error (permissions, read-only, disk full), memory
that cannot be allocated, or an unexpected internal error."""
EXIT_INTERRUPTED = 130
"""Ctrl-C or SIGTERM (128 + SIGINT, the shell's convention); whatever the run staged is removed."""

INTERRUPTED = "bagelverify: interrupted"
"""The one line an interrupted command prints on stderr."""


class UsageError(Exception):
    """A bad invocation: reported as one line on stderr with exit code 2."""


SCHEMA_VERSION = 1
"""Version of every ``--json`` document (``"schema_version"``); bumped on incompatible change."""

ENVELOPE_FIELDS = ("schema_version", "command", "ok", "exit_code", "seconds")
"""The fields every ``--json`` document starts with, in this order; the command's own fields
follow, or ``error`` when it failed (docs/json.md, docs/schema/bagelverify.schema.json)."""


class JsonEnvelope:
    """The one ``--json`` document of a run: the dispatcher (:func:`main`) writes the envelope
    (:data:`ENVELOPE_FIELDS`) around the payload a command hands to :meth:`hold`, or around an
    ``error`` object when the command raised; so every command, present or future, prints the
    same envelope without doing anything for it."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.payload: dict[str, Any] | None = None
        self.ascii_only = False
        self.started = time.perf_counter()

    def hold(self, document: dict[str, Any], *, ascii_only: bool = False) -> None:
        """Keep a command's fields for the envelope; its ``command`` may name a subcommand
        (``"lora check"``), it may not set another envelope field."""
        clash = set(document) & set(ENVELOPE_FIELDS) - {"command"}
        if clash:
            raise ValueError(f"a --json payload sets envelope fields {sorted(clash)}")
        self.command = str(document.get("command", self.command))
        self.payload = {key: value for key, value in document.items() if key != "command"}
        self.ascii_only = ascii_only

    def write(self, exit_code: int, error: BaseException | None = None) -> None:
        """Print the document on stdout: the envelope, then the payload or the error."""
        from .strict_json import dumps_json

        document: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "ok": exit_code == EXIT_OK,
            "exit_code": exit_code,
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        if error is not None:
            document["error"] = {"type": type(error).__name__, "message": one_line(error)}
        elif self.payload is not None:
            document.update(self.payload)
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        print(dumps_json(document, encoding=encoding, ascii_only=self.ascii_only))


_ENVELOPE: list[JsonEnvelope] = []
"""The envelope of the run in progress (``--json``), if any."""


def json_envelope() -> JsonEnvelope | None:
    """The envelope of the ``--json`` run in progress, or ``None`` (no ``--json``, or a command
    called outside :func:`main`)."""
    return _ENVELOPE[-1] if _ENVELOPE else None


class ArgvError(UsageError):
    """A command line argparse cannot parse, worded as argparse words it (``message``) for the
    parser (``prog``) that refused it."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


_USAGE_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    ArgumentError,
    StageError,
    ShardSizeError,
    PatternError,
    LossyCastError,
    AliasError,  # an output that is one of the inputs: the arguments are wrong
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)
_SYSTEM_ERRORS: tuple[type[BaseException], ...] = (
    AllocationError,
    UnsupportedPlatformError,
    IntegrationError,
)


def interrupted(error: BaseException) -> bool:
    """Whether ``error`` is an interrupt, or was raised while handling one (a library that
    wraps every exception, such as DCP's writer, still ends the run as an interrupt)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def exit_code_for(error: BaseException) -> int:
    """The exit code that ends a command which raised ``error``: 130 for an interrupt, 2 for a
    usage error, 1 for a problem in a checkpoint (any other :class:`BagelError`), 3 otherwise."""
    if interrupted(error):
        return EXIT_INTERRUPTED
    if isinstance(error, _USAGE_ERRORS):
        return EXIT_USAGE
    if isinstance(error, BagelError) and not isinstance(error, _SYSTEM_ERRORS):
        return EXIT_PROBLEMS
    return EXIT_FAILED


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are raised as :class:`ArgvError` (one line on
    stderr, exit code 2, and the error envelope under ``--json``)."""

    def error(self, message: str) -> NoReturn:
        raise ArgvError(self.prog, message)


def _stage(text: str) -> Stage:
    try:
        return normalize_stage(text)
    except StageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_stage_argument(parser: argparse.ArgumentParser) -> None:
    """``--stage``: any spelling :func:`~bagelverify.normalize_stage` accepts (``1``, ``2``,
    ``stage1``, ``Stage2``, ...), parsed to ``"stage1"``/``"stage2"``; left out, ``None``: the
    stage the input checkpoint holds, as the library's writers and checkers default to."""
    parser.add_argument(
        "--stage",
        type=_stage,
        default=None,
        metavar="{1,2}",
        help="1: understanding keys (UND); 2: UND + generation keys (GEN); stage1/stage2 in any "
        "case too (default: the stage the input holds, 2 when it has any GEN key)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bagelverify")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _OneLineFormatter(logging.Formatter):
    """Log records as one line each (multi-line messages are joined), tracebacks aside."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return " ".join(part.strip() for part in super().formatMessage(record).splitlines())


class _OnceFilter(logging.Filter):
    """Lets each distinct message through once per run: a check that the library makes twice
    (once to validate, once while writing) warns once."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while a command runs, so that it cleans up (staging
    folders, the demo's folder) and reports "interrupted" as for Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(error: BaseException) -> str:
    """An error's message on one line (multi-line messages are joined)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command. With ``only``, just that command's module is imported and
    configured, the others are listed with their one-line help (``""``: none is configured)."""
    parser = _Parser(
        prog="bagelverify",
        description="Check, convert and load BAGEL-7B-MoT checkpoints.",
        epilog="exit codes: 0 clean, 1 problems found in a checkpoint, 2 usage error, 3 system "
        "failure (file system, memory), 130 interrupted.\n"
        "start with:\n  bagelverify demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bagelverify {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        command = sub.add_parser(
            name,
            help=summary,
            description=summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_argument("--json", action="store_true", help="print one JSON document")
        command.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
        command.add_argument(  # SUPPRESS: do not reset a `bagelverify --debug COMMAND`
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        if only is None or name == only:
            module = importlib.import_module(module_name)
            command.epilog = f"example:\n  {module.EXAMPLE}"
            module.configure(command)
            command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (:func:`exit_code_for`).

    Everything after the ``bagelverify.cli`` import -- the command's own imports (torch) and
    argument parsing included -- runs under the interrupt path: Ctrl-C or SIGTERM at any moment
    prints one line and returns 130. Under ``--json`` the one JSON document is written here,
    for a success and for an error alike (:class:`JsonEnvelope`).
    """
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        with terminate_as_interrupt():
            return _run(words)
    except BaseException as error:
        if not interrupted(error):
            raise
        print(INTERRUPTED, file=sys.stderr)
        envelope = json_envelope()
        if envelope is not None:
            envelope.write(EXIT_INTERRUPTED, error)
        return EXIT_INTERRUPTED
    finally:
        _ENVELOPE.clear()


def _command_of(words: list[str]) -> str | None:
    return next((word for word in words if not word.startswith("-")), None)


def _unrecognized(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]
) -> ArgvError:
    """The error for arguments no parser took, from the parser of the (sub)command they were
    given to, suggesting its closest option for a mistyped flag (``--stgae``: ``--stage``)."""
    target = parser
    descended = True
    while descended:
        descended = False
        for action in target._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = getattr(args, action.dest, None)
                if chosen in action.choices:
                    target, descended = action.choices[chosen], True
                    break
    options = [option for action in target._actions for option in action.option_strings]
    flag = extra[0].split("=", 1)[0]
    close = difflib.get_close_matches(flag, options, n=1) if flag.startswith("-") else []
    hint = f"; did you mean {close[0]}?" if close else ""
    noun = "argument" if len(extra) == 1 else "arguments"
    return ArgvError(target.prog, f"unrecognized {noun}: {' '.join(extra)}{hint}")


def _parse(words: list[str]) -> argparse.Namespace:
    first = _command_of(words)
    parser = build_parser(first if first in COMMANDS else "")  # "": list the commands only
    args, extra = parser.parse_known_args(words)
    if extra:
        raise _unrecognized(parser, args, extra)
    return args


def _run(words: list[str]) -> int:
    if "--json" in words:  # the envelope exists before parsing, for argument errors too
        first = _command_of(words)
        _ENVELOPE.append(JsonEnvelope(first if first in COMMANDS else "bagelverify"))
    try:
        args = _parse(words)
    except ArgvError as error:
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        envelope = json_envelope()
        if envelope is not None:
            envelope.write(EXIT_USAGE, error)
        return EXIT_USAGE
    if not args.json:
        _ENVELOPE.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_OnceFilter())
    quiet = getattr(args, "quiet", False)
    level = logging.DEBUG if args.debug else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, handlers=[handler])
    envelope = json_envelope()
    try:
        code = int(args.run(args))
    except BrokenPipeError:  # e.g. `bagelverify inspect X | head`: the reader left
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keeps the exit flush quiet
        return EXIT_OK
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as error:  # one line; --debug adds the traceback
        if interrupted(error):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"bagelverify {args.command}: error: {one_line(error)}", file=sys.stderr)
        code = exit_code_for(error)
        if envelope is not None:
            envelope.write(code, error)
        return code
    if envelope is not None:
        envelope.write(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
