"""The ``vmm`` command: parse, build a Machine, print, exit with the documented status.

This is the only place that catches broadly: anything the user or the guest did
becomes one line ``vmm: ...`` on stderr and a status (``-v`` adds detail);
a traceback only ever means a bug in the VMM.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from kvm_abi import KvmError
from vmm.config import BACKENDS, DEFAULT_TIMEOUT, MachineConfig
from vmm.cpu.layout import CpuMode
from vmm.errors import VmmError
from vmm.memory import DEFAULT_BACKING, Backing

STATUS_EPILOG = """\
exit status of `vmm run` (QEMU-compatible: odd = the guest spoke, even = the VMM did):
  (v << 1) | 1  the guest wrote v to the exit port 0xf4
  0             every vCPU halted
  2             bad input or configuration (one line on stderr says what)
  4             the guest crashed (triple fault, internal error): vCPU and RIP reported
  124           --timeout reached
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``vmm: ...`` and status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vmm: {message} (see '{self.prog} --help')\n")


def _mode(text: str) -> CpuMode:
    try:
        return CpuMode(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown mode {text!r}") from None


def _arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--arg {text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    return key, value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad timeout {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the timeout must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmm", description="Run tiny guest images on KVM (or an in-process emulator).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser(
        "run",
        help="run a guest image",
        description="Run a guest image; its serial console goes to stdout.",
        epilog=STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("image", help="guest image: ELF32/ELF64 executable or flat binary")
    run.add_argument(
        "--mem", default="64M", metavar="SIZE", help="guest RAM, e.g. 64M, 1G (bare number: MiB; default 64M)"
    )
    run.add_argument("--vcpus", type=int, default=1, metavar="N", help="number of vCPUs (default 1)")
    run.add_argument(
        "--mode", type=_mode, metavar="MODE", help="CPU mode: real, protected, long, user (default: the image's)"
    )
    run.add_argument(
        "--load-addr", metavar="ADDR", help="flat binaries: where to load (default 0x7c00 real mode, else 0x100000)"
    )
    run.add_argument("--entry", metavar="ADDR", help="start here instead of the image's entry point")
    run.add_argument(
        "--arg",
        type=_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="boot argument for the guest (repeatable)",
    )
    run.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"stop the guest after this long (default {DEFAULT_TIMEOUT:g}; 0 = never)",
    )
    run.add_argument("--strict", action="store_true", help="an access to a port or address no device claims is fatal")
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="where vCPUs run (default auto: KVM if usable, else the emulator)",
    )
    run.add_argument(
        "--memory",
        choices=[b.value for b in Backing],
        default=DEFAULT_BACKING.value,
        help=f"guest RAM backing (default {DEFAULT_BACKING.value})",
    )
    run.add_argument(
        "--prefault",
        metavar="STRATEGY",
        nargs="?",
        const="auto",
        help="populate guest RAM before boot: auto (default if no value), kernel, map-memory, emulated, host, none",
    )
    run.add_argument("--threads", type=int, metavar="N", help="threads for --prefault (default: one per host CPU)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of the console")
    run.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    run.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (unclaimed I/O) and registers on a crash"
    )

    caps = sub.add_parser("caps", help="what this host's KVM offers", description="Report the host's KVM capabilities.")
    caps.add_argument("--json", action="store_true", help="one JSON object (capability names without KVM_CAP_)")

    _add_prefault_parser(sub)
    return parser


def _add_prefault_parser(sub: Any) -> None:
    try:
        from vmm.prefault.cli import add_parser
    except ImportError:
        return
    add_parser(sub)


def _notice(message: str) -> None:
    print(f"vmm: {message}", file=sys.stderr, flush=True)


def cmd_run(ns: argparse.Namespace) -> int:
    config = MachineConfig(
        image=ns.image,
        mem=ns.mem,
        vcpus=ns.vcpus,
        mode=ns.mode,
        load_addr=ns.load_addr,
        entry=ns.entry,
        args=dict(ns.arg),
        timeout=ns.timeout,
        strict=ns.strict,
        backend=ns.backend,
        memory=ns.memory,
        prefault=ns.prefault,
        prefault_threads=ns.threads,
    )
    from vmm.machine import Machine

    console = None if ns.json else sys.stdout.buffer
    machine = Machine(config, console=console, notice=_notice, progress=not ns.json and sys.stderr.isatty())
    result = machine.run()
    if ns.json:
        print(json.dumps(result.to_json()))
        return result.status
    sys.stdout.flush()
    if result.prefault is not None and not ns.quiet:
        _notice(f"prefault: {result.prefault.summary()}")
    if result.crash is not None:
        _notice(result.reason)
        if ns.verbose and result.crash.regs:
            regs = " ".join(f"{k}={v:#x}" for k, v in result.crash.regs.items())
            print(f"vmm: registers: {regs}", file=sys.stderr)
    elif not ns.quiet:
        _notice(result.summary())
    return result.status


def cmd_caps(ns: argparse.Namespace) -> int:
    from vmm.caps import caps_report, format_caps

    report = caps_report()
    if ns.json:
        print(json.dumps(report))
    else:
        print(format_caps(report))
    return 0


COMMANDS = {"run": cmd_run, "caps": cmd_caps}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmm`` console script; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(ns, "verbose", False) else logging.WARNING,
        format="vmm: %(name)s: %(message)s",
    )
    handler = COMMANDS.get(ns.command) or getattr(ns, "handler", None)
    try:
        return int(handler(ns))
    except VmmError as e:
        _notice(str(e))
        if getattr(ns, "verbose", False):
            logging.getLogger("vmm").debug("details", exc_info=True)
        return e.status
    except KvmError as e:  # KVM refused something the configuration asked for
        _notice(str(e))
        return 2
    except KeyboardInterrupt:
        _notice("interrupted")
        return 130
    except BrokenPipeError:
        return 141
