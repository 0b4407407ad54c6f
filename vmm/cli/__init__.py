"""The ``vmm`` command: one file per subcommand (run, caps, prefault, qemu), thin.

This is the only place that catches broadly: anything the user or the guest did becomes
one line ``vmm: ...`` on stderr and a status (``-v`` adds detail); a traceback only ever
means a bug in the VMM. The host's own streams are not trusted either: a closed or broken
stdout/stderr never changes the guest's status (:mod:`vmm.cli.streams`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import NoReturn

from kvm_abi import KvmError
from vmm.cli import streams
from vmm.errors import VmmError

STATUS_BROKEN_PIPE = 141  # the shell's 128 + SIGPIPE
STATUS_INTERRUPTED = 130
STATUS_INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE: even, and no guest can produce it


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``vmm: ...`` and status 2."""

    def error(self, message: str) -> NoReturn:
        streams.notice(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)

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


def build_parser() -> argparse.ArgumentParser:
    """The ``vmm`` parser with every subcommand."""
    from vmm.cli import caps, prefault, qemu, run

    parser = Parser(prog="vmm", description="Run tiny guest images on KVM (or an in-process emulator).")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    run.add_parser(sub)
    caps.add_parser(sub)
    prefault.add_parser(sub)
    qemu.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmm`` console script; returns the exit status."""
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except streams.BrokenStdout:  # --help or --version into a pipe whose reader left
        return STATUS_BROKEN_PIPE
    return dispatch(ns)


def dispatch(ns: argparse.Namespace) -> int:
    """Run the parsed command, mapping every error to its one line and status."""
    verbose = bool(getattr(ns, "verbose", False))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="vmm: %(name)s: %(message)s",
        stream=streams.StderrProxy(),
    )
    try:
        return int(ns.handler(ns))
    except VmmError as e:
        streams.notice(str(e))
        if verbose:
            logging.getLogger("vmm").debug("details", exc_info=True)
        return e.status
    except KvmError as e:  # KVM refused something the configuration asked for
        streams.notice(str(e))
        return 2
    except KeyboardInterrupt:
        streams.notice("interrupted")
        return STATUS_INTERRUPTED
    except streams.BrokenStdout:
        return STATUS_BROKEN_PIPE
    except Exception as e:  # a bug in the VMM: its own status, never one a guest could give
        streams.notice(f"internal error in the VMM (a bug; -v shows the traceback): {e!r}")
        if verbose:
            logging.getLogger("vmm").error("traceback", exc_info=True)
        return STATUS_INTERNAL_ERROR
