"""The ``vmm`` command: one file per subcommand (run, caps, prefault, qemu, schema), thin.

This is the only place that catches broadly: anything the user or the guest did becomes
one line ``vmm: ...`` on stderr and a status (``-v`` adds detail); a traceback only ever
means a bug in the VMM. The host's own streams are not trusted either: a closed or broken
stdout/stderr never changes the guest's status (:mod:`vmm.cli.streams`).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from vmm.cli import streams
from vmm.errors import VmmError

STATUS_BROKEN_PIPE = 141  # the shell's 128 + SIGPIPE
STATUS_INTERRUPTED = 130
STATUS_INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE: even, and no guest can produce it


class UsageError(SystemExit):
    """A command line argparse refused: status 2, reported by :func:`main` or
    :func:`dispatch` (as JSON on stdout too under ``--json``)."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(2)
        self.message = message
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``vmm: ...`` and status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)

    def _print_message(self, message: str, file: object = None) -> None:
        # --help and --version go to stdout; a closed or broken stdout must not traceback.
        streams.write_text(message, stderr=file is not None and file is not streams.stdout_text())


def installed_version() -> str:
    """The installed distribution's version (importlib.metadata); ``unknown`` when vmm runs
    from a checkout that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vmm")
    except PackageNotFoundError:
        return "unknown (not installed)"


class VersionAction(argparse.Action):
    """``--version``: looked up only when asked for (importlib.metadata costs start-up time)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_args: object, **_kwargs: object) -> NoReturn:
        parser._print_message(f"vmm {installed_version()}\n")
        raise SystemExit(0)


SUBCOMMANDS = ("run", "caps", "prefault", "qemu", "schema")
"""The subcommands, one module of this package each, in ``--help``'s order."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``vmm`` parser with every subcommand, or with subcommand ``only`` alone (what
    :func:`main` builds when the command line names one: the others' modules and parsers
    are start-up time a run does not need)."""
    import importlib

    parser = Parser(prog="vmm", description="Run tiny guest images on KVM (or an in-process emulator).")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in SUBCOMMANDS:
        if only is None or name == only:
            importlib.import_module(f"vmm.cli.{name}").add_parser(sub)
    return parser


def wants_json(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for ``--json`` (or an abbreviation argparse would take), so an
    error found before or while parsing is reported as JSON too. ``vmm qemu``'s arguments
    are QEMU's, never ours."""
    if argv and argv[0] == "qemu":
        return False
    for arg in argv:
        if arg == "--":
            break
        if len(arg) >= 3 and "--json".startswith(arg):
            return True
    return False


def fail(message: str, status: int, *, json_output: bool) -> int:
    """Report an error: one line on stderr and, under ``--json``, the error object
    (``vmm/schema/error.json``) on stdout. Returns ``status``."""
    streams.notice(message)
    if json_output:
        import json  # only here: not on every command's start-up

        from vmm.schema import SCHEMA_VERSION

        error = {"schema_version": SCHEMA_VERSION, "error": message, "status": status}
        try:
            streams.write_text(json.dumps(error) + "\n")
        except streams.BrokenStdout:
            return STATUS_BROKEN_PIPE
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmm`` console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    # Start-up is imports and building objects that no reference cycle holds: the cyclic
    # GC's collections meanwhile are pure cost (~5 ms of a ~45 ms start-up, measured). It
    # is off until `vmm run` has built its machine (cmd_run calls ``ns.resume_gc`` before
    # the guest starts), or the parsed command is another one; on again at the end.
    pause = _GcPause()
    try:
        try:
            ns = build_parser(args[0] if args and args[0] in SUBCOMMANDS else None).parse_args(args)
        except UsageError as e:
            return _usage_error(e, json_output=wants_json(args))
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 2
        except streams.BrokenStdout:  # --help or --version into a pipe whose reader left
            return STATUS_BROKEN_PIPE
        if ns.command != "run":
            pause.resume()
        ns.resume_gc = pause.resume
        return dispatch(ns)
    finally:
        pause.resume()


class _GcPause:
    """The cyclic GC off from creation until :meth:`resume` (idempotent), counted across
    threads: on again when the last pause ends, and only if it was on before the first."""

    _lock = threading.Lock()
    _depth = 0
    _was_enabled = False

    def __init__(self) -> None:
        self._active = True
        with _GcPause._lock:
            if _GcPause._depth == 0:
                _GcPause._was_enabled = gc.isenabled()
                gc.disable()
            _GcPause._depth += 1

    def resume(self) -> None:
        with _GcPause._lock:
            if not self._active:
                return
            self._active = False
            _GcPause._depth -= 1
            if _GcPause._depth == 0 and _GcPause._was_enabled:
                gc.enable()


def _usage_error(e: UsageError, *, json_output: bool) -> int:
    if json_output:
        return fail(e.message, 2, json_output=True)
    streams.notice(f"{e.message} (see '{e.prog} --help')")
    return 2


def dispatch(ns: argparse.Namespace) -> int:
    """Run the parsed command, mapping every error to its one line and status (and,
    under ``--json``, to the error object on stdout)."""
    from kvm_abi import KvmError  # here: the commands that reach KVM import it anyway
    from vmm.cli.logs import setup_logging

    verbose = bool(getattr(ns, "verbose", False))
    as_json = bool(getattr(ns, "json", False))
    setup_logging(ns)
    try:
        return int(ns.handler(ns))
    except UsageError as e:  # `vmm qemu` parses the `vmm run` line it translated to
        return _usage_error(e, json_output=as_json)
    except VmmError as e:
        if verbose:
            logging.getLogger("vmm").debug("details", exc_info=True)
        return fail(str(e), e.status, json_output=as_json)
    except KvmError as e:  # KVM refused something the configuration asked for
        return fail(str(e), 2, json_output=as_json)
    except KeyboardInterrupt:
        return fail("interrupted", STATUS_INTERRUPTED, json_output=as_json)
    except streams.BrokenStdout:
        return STATUS_BROKEN_PIPE
    except Exception as e:  # a bug in the VMM: its own status, never one a guest could give
        if verbose:
            logging.getLogger("vmm").error("traceback", exc_info=True)
        message = f"internal error in the VMM (a bug; -v shows the traceback): {e!r}"
        return fail(message, STATUS_INTERNAL_ERROR, json_output=as_json)
