"""The ``edge-shitu`` command. ``main(argv) -> int`` is the entry point and is tested in-process.

The runtime's commands live in this package, one module per concern (:mod:`.images`, :mod:`.gallery`,
:mod:`.calibrate`, :mod:`.bundle`). Commands of the tools beside the runtime (conversion, models,
hash training, benchmarks) are plugins: packages register them under the ``edge_shitu.commands``
entry point group with a ``register(subparsers, groups)`` function, and the runtime never names
them. A known command whose plugin is not installed still appears in ``--help`` with the extra to
install. Errors: one line on stderr naming the file and the problem, exit code 2 for bad input,
1 for other failures; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from importlib import metadata
from typing import Optional, Sequence, TextIO

from edge_shitu import __version__
from edge_shitu.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, one_line
from edge_shitu.errors import BackendUnavailableError, EdgeShituError

__all__ = ["main", "EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT", "PLUGIN_GROUP"]

PLUGIN_GROUP = "edge_shitu.commands"
"""Entry point group of command plugins: ``name = "package.module:register"``."""

# The runtime's own command modules, in the order their commands appear.
_MODULES = ("images", "gallery", "calibrate", "bundle", "serve")

# Commands that come with an extra, for --help when their plugin is not installed: command -> extra.
_OPTIONAL_COMMANDS = {"models": "convert", "replicate": "convert", "convert": "convert", "quickstart": "convert",
                      "hash": "convert", "bench": "bench"}


def _plugins():
    return sorted(metadata.entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)


def _not_installed(extra: str):
    def run(args, out: TextIO, err: TextIO) -> int:
        raise BackendUnavailableError(f"`{args.command}` is not installed; run: pip install \"edge-shitu[{extra}]\"")

    return run


def _parser(err: TextIO) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-shitu", description="PP-ShiTu recognition on edge devices.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict = {}
    for name in _MODULES:
        importlib.import_module(f"edge_shitu.cli.{name}").register(sub, groups)
    for ep in _plugins():
        try:
            ep.load()(sub, groups)
        except Exception as exc:  # a broken plugin must not take the device commands down with it
            err.write(f"edge-shitu: warning: command plugin {ep.name!r} ({ep.value}) failed to load: {one_line(exc)}\n")
    for command, extra in _OPTIONAL_COMMANDS.items():
        if command not in sub.choices:
            sp = sub.add_parser(command, help=f"[not installed: pip install \"edge-shitu[{extra}]\"]", add_help=False)
            sp.set_defaults(func=_not_installed(extra), placeholder=True)
    return p


def main(argv: Optional[Sequence[str]] = None, *, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None) -> int:
    """Run the command line.

    Args:
      argv: arguments without the program name; ``None`` reads ``sys.argv``.
      stdout: where results go (default ``sys.stdout``).
      stderr: where errors and progress go (default ``sys.stderr``).

    Returns:
      0 on success, 2 for bad input (missing or undecodable files, bad arguments), 1 for other failures.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = _parser(err)
    try:
        # argparse writes usage and help to the process streams; send them where the caller asked.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args, extra = parser.parse_known_args(argv)
            # argparse stops filling a positional list at the first option; file names that follow
            # options ("add G.db --label L a.jpg b.jpg") belong to the command's list all the same.
            target = next((n for n in ("paths", "images") if isinstance(getattr(args, n, None), list)), None)
            if getattr(args, "placeholder", False):
                pass  # the command is not installed: whatever follows it is not ours to judge
            elif extra and target and not any(e.startswith("-") for e in extra):
                setattr(args, target, list(getattr(args, target) or []) + extra)
            elif extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            if args.version:
                out.write(f"edge-shitu {__version__}\n")
                return EXIT_OK
            if args.command is None:
                parser.error("a command is required")
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return args.func(args, out, err)
    except BrokenPipeError:
        # The reader went away (`edge-shitu gallery list | head`): what it wanted was written.
        _silence_stdout(out)
        return EXIT_OK
    except BackendUnavailableError as exc:
        _report(exc, args, err)
        return EXIT_FAILURE
    except (EdgeShituError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        _report(exc, args, err)
        bad_input = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
        return EXIT_BAD_INPUT if isinstance(exc, bad_input) else EXIT_FAILURE
    except KeyboardInterrupt:
        err.write("edge-shitu: interrupted\n")
        return 130
    except MemoryError:
        err.write("edge-shitu: error: out of memory; use smaller inputs or batches (nothing was changed)\n")
        return EXIT_FAILURE
    except OSError as exc:  # the machine's limits (a full disk, too many open files): not our bug
        _report(exc, args, err)
        return EXIT_FAILURE
    except Exception as exc:  # a bug of ours: still one line, unless --debug
        _report(exc, args, err, unexpected=True)
        return EXIT_FAILURE


def _silence_stdout(out: TextIO) -> None:
    # Python flushes sys.stdout at exit; into a closed pipe that prints a second error.
    if out is sys.stdout:
        import os

        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


def _report(exc: BaseException, args, err: TextIO, *, unexpected: bool = False) -> None:
    if getattr(args, "debug", False):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=err)
    prefix = "internal error: " if unexpected else ""
    if isinstance(exc, OSError) and not isinstance(exc, EdgeShituError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = exc
    err.write(f"edge-shitu: error: {prefix}{one_line(text)}\n")
    if unexpected and not getattr(args, "debug", False):
        err.write("edge-shitu: run again with --debug for the traceback\n")
