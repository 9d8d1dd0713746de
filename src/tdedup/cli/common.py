"""What every command shares: consoles, the error boundary, progress bars, sizes.

Data and ``--json`` go to stdout; progress, warnings and ``hint:`` lines go to stderr.
rich honours ``NO_COLOR`` itself; we also turn colour off when ``TERM=dumb``.

Untrusted strings (paths, tensor and model names, manifest fields, tool versions) are
never markup: the consoles here parse no markup and no emoji codes at all, and every
untrusted string goes into rich as :func:`plain` ``Text`` (safe on any console), with
control characters and unencodable surrogates shown as escapes (:func:`clean`), also in
the plain ``error:``/``warning:``/``hint:`` lines.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional, TypeVar

import typer
from typer.core import TyperGroup  # loaded by ``import typer`` already: no start-up cost

from .._fs import remove_own_temps
from ..errors import TdedupError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

# rich is imported by the functions that draw with it (15 ms of start-up): a command
# whose output is JSON or plain lines on a pipe never needs it.

EXIT_OK, EXIT_THRESHOLD, EXIT_ERROR = 0, 1, 2

F = TypeVar("F", bound=Callable)


# C0 and C1 controls, DEL, and lone surrogates (a file name that is not valid UTF-8).
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: Bidirectional controls and line separators: printed raw they reorder or split a line.
_BIDI_CHARS = re.compile("[\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def clean(text: object) -> str:
    """``text`` with every control character and lone surrogate written as an escape
    (``\\x1b``, ``\\udcff``), and bidirectional controls and line separators too
    (``\\u202e``): a name can neither move the cursor of a terminal, nor reorder or split
    the line it is printed on, nor make printing fail on encoding."""
    out = _UNSAFE_CHARS.sub(lambda m: m.group().encode("unicode_escape",
                                                       "backslashreplace").decode("ascii"),
                            str(text))
    return _BIDI_CHARS.sub(lambda m: f"\\u{ord(m.group()):04x}", out)


def plain(text: object, style: str = "") -> Text:
    """An untrusted string as rich ``Text``: printed as it is, never read as markup."""
    from rich.text import Text
    return Text(clean(text), style=style)


def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"


def stdout_console() -> Console:
    """Console for data (tables, JSON): stdout. Created per call so tests can capture it."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits 1 here; hand it to ``guarded`` so that every output path (rich
            # or print) ends the same way when the reader of stdout goes away.
            raise BrokenPipeError

    return _Console(file=sys.stdout, no_color=_no_color(), soft_wrap=False, markup=False,
                    emoji=False)


def stderr_console() -> Console:
    """Console for progress, warnings and hints: stderr."""
    from rich.console import Console
    return Console(file=sys.stderr, no_color=_no_color(), stderr=True, markup=False,
                   emoji=False)


#: What makes rich draw on a file that is not a terminal (``Console.is_terminal``).
_TERMINAL_ENV = ("FORCE_TERMINAL", "TTY_COMPATIBLE", "FORCE_COLOR")


def _may_be_terminal() -> bool:
    """False only where rich would say stderr is not a terminal: without rich. (Run
    with fd 2 closed, ``sys.stderr`` is None.)"""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty()) or any(k in os.environ for k in _TERMINAL_ENV)
    except ValueError:  # closed
        return False


def warn(message: str) -> None:
    # Plain print: one line that tools can grep, never wrapped at the terminal's width.
    print(f"warning: {clean(message)}", file=sys.stderr)


def warn_skipped(models) -> None:
    """One warning per model whose folder scan left entries out (hidden folders, folders
    that cannot be listed, non-regular files, dangling links; issue 14, cause 20); the
    JSON and Markdown reports of analyze list them all."""
    for m in models:
        if m.skipped:
            shown = ", ".join(m.skipped[:5])
            more = f" and {len(m.skipped) - 5} more" if len(m.skipped) > 5 else ""
            warn(f"{m.name}: skipped {shown}{more}")


def hint(message: str) -> None:
    print(f"hint: {clean(message)}", file=sys.stderr)


def report_error(err: BaseException) -> None:
    """One line on stderr naming the file and the problem; the traceback only if asked."""
    if os.environ.get("TDEDUP_DEBUG"):
        traceback.print_exception(err, file=sys.stderr)
    line = err.message if isinstance(err, TdedupError) else f"{type(err).__name__}: {err}"
    print(f"error: {clean(line)}", file=sys.stderr)
    if isinstance(err, TdedupError) and err.hint:
        print(f"hint: {clean(err.hint)}", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C: every ``with`` block and
    ``except BaseException`` cleanup (temporary files, created folders) then runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Make SIGTERM unwind the stack instead of killing the process where it stands
    (which left temporary files behind); the old handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def guarded(fn: F) -> F:
    """Map tdedup's exceptions (and the OS's) to one line and exit code 2; SIGTERM and
    Ctrl-C clean up and exit 143 and 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_unwinds():
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:
            # The reader of stdout went away (`tdedup analyze --json | head`): not an error
            # of ours. Point stdout at /dev/null so the interpreter's final flush is quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(EXIT_OK) from None
        except TdedupError as e:
            report_error(e)
            raise typer.Exit(EXIT_ERROR) from None
        except OSError as e:  # disk full, permission denied: still one line, exit 2
            report_error(TdedupError(e.strerror or str(e), path=e.filename))
            raise typer.Exit(EXIT_ERROR) from None
        except MemoryError:
            # A size no check could foresee (the system's memory moved meanwhile).
            report_error(TdedupError("not enough memory for this operation"))
            raise typer.Exit(EXIT_ERROR) from None
        except Terminated as e:
            remove_own_temps()
            if os.environ.get("TDEDUP_DEBUG"):
                traceback.print_exception(e, file=sys.stderr)
            print("error: terminated", file=sys.stderr)
            raise typer.Exit(128 + signal.SIGTERM) from None
        except KeyboardInterrupt:
            remove_own_temps()
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 model``, ``2 models``: a count with its noun in the right number."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _usage_message(text: str) -> str:
    """click's ``Missing option '-o' / '--output'.`` in the project's style:
    ``missing option '-o' / '--output'`` (no capital, no full stop)."""
    # typer 0.29 validates through pydantic, whose messages start "Value error, ".
    text = text.strip().replace("Value error, ", "")
    if re.match(r"[A-Z][a-z]", text):
        text = text[0].lower() + text[1:]
    return text[:-1] if text.endswith(".") else text


def _help_hint(ctx, command_path: str | None) -> str | None:
    """``tdedup pack --help``: where the usage of the command at fault is written."""
    if ctx is None or ctx.command.get_help_option(ctx) is None:
        return None
    names = ctx.help_option_names
    option = next((n for n in names if n.startswith("--")), names[0])
    return f"{command_path or ctx.command_path} {option}"


@contextmanager
def _one_line_usage_errors(ctx) -> Iterator[None]:
    """A usage error typer/click detected (missing option or argument, invalid choice,
    number out of range, unknown option or command) as one ``error:`` line and a
    ``hint:`` line naming the help, exit 2; not typer's box of usage lines.

    typer's errors all derive from its public ``typer.TyperException``. The text is
    written by :func:`print` through :func:`clean`, like every ``error:`` line: nothing
    read as markup, no colour (so ``NO_COLOR`` holds), no control character or newline
    from a user's argument reaching the terminal.
    """
    try:
        yield
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare ``tdedup``: typer shows the help
            raise
        if os.environ.get("TDEDUP_DEBUG"):
            traceback.print_exception(e, file=sys.stderr)
        err_ctx = getattr(e, "ctx", None)
        path = None
        if err_ctx is None and ctx is not None:
            # Raised by the option parser, which knows no context (``pack -o`` with no
            # value): the command being parsed is the one the group was invoking.
            err_ctx = ctx
            if ctx.invoked_subcommand:
                path = f"{ctx.command_path} {ctx.invoked_subcommand}"
        print(f"error: {clean(_usage_message(e.format_message()))}", file=sys.stderr)
        shown = _help_hint(err_ctx, path)
        if shown:
            hint(shown)
        raise typer.Exit(EXIT_ERROR) from None


class OneLineUsageErrors(TyperGroup):
    """The app's group (``typer.Typer(cls=...)``, typer's public hook): usage errors found
    while parsing the command line, the root's or a command's, are one line
    (:func:`_one_line_usage_errors`). Help, completion and ``--version`` are untouched."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors(parent):
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage_errors(ctx):
            return super().invoke(ctx)


@contextmanager
def phased_progress(quiet: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback ``(phase, advance, total)`` drawing one bytes bar per phase on
    stderr (bytes/s, ETA).

    Hidden when stderr is not a terminal or ``quiet`` is set, so logs and pipes stay clean.
    """
    if quiet or not _may_be_terminal():
        yield lambda phase, n, total: None
        return
    console = stderr_console()
    if not console.is_terminal:
        yield lambda phase, n, total: None
        return
    # Imported here: ``--help`` and ``--version`` draw no bar (5 ms of start-up).
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description:<10}", markup=False), BarColumn(), TaskProgressColumn(),
                  DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        tasks: dict[str, TaskID] = {}

        def update(phase: str, n: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(clean(phase), total=total)
            progress.advance(tasks[phase], n)

        yield update


@contextmanager
def byte_progress(description: str, total: int, *, quiet: bool = False
                  ) -> Iterator[Callable[[int], None]]:
    """One bytes progress bar of :func:`phased_progress`; yields ``advance(n)``."""
    with phased_progress(quiet) as update:
        yield lambda n: update(description, n, total)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks and downloads are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


# -- option types every command shares (one spelling, one help text) --------------------

Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Include = Annotated[Optional[list[str]], typer.Option(
    "--include", metavar="GLOB",
    help="Only inputs whose model name or path matches (repeatable).")]
Exclude = Annotated[Optional[list[str]], typer.Option(
    "--exclude", metavar="GLOB",
    help="Skip inputs whose model name or path matches (repeatable).")]
Level = Annotated[int, typer.Option(
    "--level", min=-7, max=22,
    help="zstd level: up to 3, fast settings (smallest per second); above 3, float planes "
         "also try zstd's best entropy coding (MiniLM F32: 0.05 % smaller, ~3x slower).")]
Delta = Annotated[str, typer.Option(
    "--delta", help="auto: store near-identical tensors as base + delta; off: never.")]
Derive = Annotated[str, typer.Option(
    "--derive", help="auto: store tensors another model's tensor computes (a cast, a ggml "
    "quantization) as transform + residual, and repeated file layouts against each other; "
    "off: never.")]
BundleArg = Annotated[Path, typer.Argument(help="The bundle (.tdd).")]


def print_json(doc: object) -> None:
    """One JSON document on stdout (the ``--json`` of every command)."""
    print(json.dumps(doc, indent=2, ensure_ascii=False))
