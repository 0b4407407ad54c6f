"""``vmm run IMAGE``: build a Machine from the options, run it, print, exit with its status."""

from __future__ import annotations

import argparse
import os
from typing import IO, Any

from vmm.cli import streams
from vmm.cli.logs import add_log_level
from vmm.config import BACKENDS, DEFAULT_TIMEOUT, MachineConfig
from vmm.memory import DEFAULT_BACKING, Backing

STATUS_EPILOG = """\
exit status of `vmm run` (QEMU-compatible: odd = the guest spoke, even = the VMM did):
  (v << 1) | 1  the guest wrote v to the exit port 0xf4
  0             every vCPU halted, the guest reset the machine (i8042 0xfe, port 0x92), or gdb's kill
  2             bad input or configuration (one line on stderr says what)
  4             the guest crashed (triple fault, internal error): vCPU and RIP reported
  124           --timeout reached
  130           interrupted (Ctrl-C, SIGTERM or SIGHUP), or Ctrl-A x on the terminal
  70            an internal error in the VMM (a bug: please report it; -v shows the traceback)
  141           stdout was closed by its reader (a pipe into head)
"""


def _arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--arg {text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    return key, value


def _module(text: str) -> tuple[str, str | None]:
    from vmm.config_file import split_module
    from vmm.errors import InputError

    try:
        return split_module(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"use on or off, not {text!r}")
    return text == "on"


def add_run_options(run: argparse.ArgumentParser) -> None:
    """The options of ``vmm run`` (also what ``vmm qemu`` maps onto). An option the user
    did not give is None, so ``--config FILE`` can fill it; MachineConfig has the defaults."""
    run.add_argument(
        "image",
        nargs="?",
        help="guest image: Linux bzImage or PVH vmlinux, Multiboot kernel, ELF32/ELF64 executable or flat binary; "
        "a name that is not a file names a bundled guest (hello64, pc/mbinfo, ...)",
    )
    run.add_argument("--kernel", metavar="FILE", help="the same as IMAGE (QEMU's and Firecracker's name for it)")
    run.add_argument(
        "--config",
        metavar="FILE",
        help="the machine from a JSON or TOML file of MachineConfig fields (image, mem, vcpus, ...); "
        "the options given here override it",
    )
    run.add_argument("--initrd", metavar="FILE", help="Linux: the initramfs")
    run.add_argument(
        "--mem", "-m", metavar="SIZE", help="guest RAM, e.g. 64M, 1G (bare number: MiB; default 64M); -m as QEMU's"
    )
    run.add_argument("--vcpus", "-smp", metavar="N", help="number of vCPUs (default 1); -smp as QEMU's")
    run.add_argument("--mode", metavar="MODE", help="CPU mode: real, protected, long, user (default: the image's)")
    run.add_argument(
        "--load-addr", metavar="ADDR", help="flat binaries: where to load (default 0x7c00 real mode, else 0x100000)"
    )
    run.add_argument("--entry", metavar="ADDR", help="start here instead of the image's entry point")
    run.add_argument(
        "--arg", type=_arg, action="append", default=[], metavar="KEY=VALUE", help="boot argument (repeatable)"
    )
    run.add_argument(
        "--append",
        metavar="TEXT",
        help="the kernel command line (Linux: after 'console=ttyS0 reboot=k panic=-1'; Multiboot: after the image)",
    )
    run.add_argument(
        "--module",
        type=_module,
        action="append",
        default=[],
        metavar="FILE[=STRING]",
        help="Multiboot: a module and its string (default: the file name); repeatable",
    )
    run.add_argument(
        "--fw-cfg",
        action="append",
        default=[],
        metavar="name=NAME,file=PATH|string=TEXT",
        help="a fw_cfg file for the guest, QEMU's -fw_cfg syntax; repeatable",
    )
    run.add_argument(
        "--irqchip",
        type=_on_off,
        metavar="on|off",
        help="KVM: the PC's interrupt controllers and PIT in the kernel (default on)",
    )
    run.add_argument(
        "--timeout",
        metavar="SECONDS",
        help=f"stop the guest after this long (default {DEFAULT_TIMEOUT:g}; 0 = never)",
    )
    run.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="an access to a port or address no device claims is fatal",
    )
    run.add_argument("--backend", choices=BACKENDS, help="where vCPUs run (default auto: KVM if usable)")
    run.add_argument(
        "--memory",
        choices=[b.value for b in Backing],
        help=f"guest RAM backing (default {DEFAULT_BACKING.value})",
    )
    run.add_argument(
        "--prefault",
        metavar="STRATEGY",
        nargs="?",
        const="auto",
        help="populate guest RAM before boot: auto (default if no value), kernel, map-memory, emulated, host, none",
    )
    run.add_argument("--threads", metavar="N", help="threads for --prefault (default: one per host CPU)")
    run.add_argument(
        "--count-faults",
        action="store_true",
        default=None,
        help="KVM: count the stage-2/shadow page faults each vCPU takes (tracefs); in the summary and --json",
    )
    run.add_argument(
        "--gdb",
        metavar="tcp::PORT|tcp:HOST:PORT",
        help="KVM: serve gdb's remote protocol here (tcp::PORT listens on 127.0.0.1; PORT 0 picks a free one)",
    )
    run.add_argument("-s", dest="gdb_default", action="store_true", help="the same as --gdb tcp::1234 (QEMU's -s)")
    run.add_argument(
        "-S", dest="gdb_wait", action="store_true", help="with a gdb stub: start the guest only when gdb continues"
    )
    run.add_argument(
        "--serial",
        default="stdio",
        metavar="FILE|stdio|none",
        help="COM1: stdio (default: output to stdout, input from stdin; on a terminal Ctrl-A x quits), "
        "a FILE to write the output to (created or truncated; no input), or none",
    )
    run.add_argument("--json", action="store_true", help="print one JSON object instead of the console")
    run.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging and registers on a crash")
    add_log_level(run)


def add_parser(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run a guest image",
        description="Run a guest image; its serial console goes to stdout.",
        epilog=STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_options(run)
    run.set_defaults(handler=cmd_run)


def _given(ns: argparse.Namespace) -> dict[str, Any]:
    """The MachineConfig fields the command line set, by field name."""
    from vmm.errors import InputError

    if ns.image is not None and ns.kernel is not None:
        raise InputError("give the image once: as IMAGE or as --kernel FILE")
    fields = {
        "image": ns.kernel if ns.image is None else ns.image,
        "initrd": ns.initrd,
        "mem": ns.mem,
        "vcpus": ns.vcpus,
        "mode": ns.mode,
        "load_addr": ns.load_addr,
        "entry": ns.entry,
        "args": dict(ns.arg) or None,
        "timeout": ns.timeout,
        "strict": ns.strict,
        "backend": ns.backend,
        "memory": ns.memory,
        "prefault": ns.prefault,
        "prefault_threads": ns.threads,
        "irqchip": ns.irqchip,
        "append": ns.append,
        "modules": tuple(ns.module) or None,
        "fw_cfg": tuple(ns.fw_cfg) or None,
        "count_faults": ns.count_faults,
        "gdb": ns.gdb if ns.gdb is not None else ("tcp::1234" if ns.gdb_default else None),
        "gdb_wait": ns.gdb_wait or None,
    }
    return {key: value for key, value in fields.items() if value is not None}


def config_from(ns: argparse.Namespace) -> MachineConfig:
    """The MachineConfig the parsed options describe, over ``--config FILE``'s values
    (validated: InputError if not). An image that is not a file may name a bundled guest."""
    from vmm import guests
    from vmm.errors import InputError

    values = _given(ns)
    if ns.config is not None:
        from vmm.config_file import load_config_file, merge

        values = merge(load_config_file(ns.config), values)
    image = values.pop("image", None)
    if image is None:
        where = "as IMAGE or as --kernel FILE" + (" (or as image in the --config file)" if ns.config else "")
        raise InputError(f"give the image once: {where}")
    return MachineConfig.parse(guests.resolve(image), **values)


def _open_serial_file(path: str) -> IO[bytes]:
    """``--serial FILE``: created or truncated; InputError (one line, status 2) if it cannot be."""
    from vmm.errors import InputError

    if os.path.isdir(path):
        raise InputError(f"--serial {path}: is a directory")
    try:
        return open(path, "wb")  # closed by the ExitStack of cmd_run
    except OSError as e:
        raise InputError(f"--serial {path}: {e.strerror or e}") from None


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def cmd_run(ns: argparse.Namespace) -> int:
    import contextlib

    config = config_from(ns)
    from vmm.machine import STATUS_BROKEN_PIPE, Machine

    with contextlib.ExitStack() as stack:
        console: IO[bytes] | None = None
        stdin: int | None = None
        tty = False
        if ns.serial == "stdio":
            if not ns.json:
                console = streams.stdout_binary()
                if console is None:
                    streams.notice("stdout is closed: the guest's console is not shown")
            if _fd_open(0):
                stdin = 0
                if os.isatty(0):
                    from vmm.cli import terminal  # termios and signals only for a terminal

                    if terminal.in_background(0):
                        stdin = None  # reading it or changing its mode would stop us (SIGTTIN/SIGTTOU)
                    else:
                        tty = True
                        stack.enter_context(terminal.raw_mode(0))
        elif ns.serial != "none":
            console = stack.enter_context(_open_serial_file(ns.serial))
        machine = Machine(
            config,
            console=console,
            notice=streams.notice,
            progress=not ns.json and _stderr_is_tty(),
            before_boot=lambda _machine: getattr(ns, "resume_gc", lambda: None)(),  # see vmm.cli.main
            console_input=stdin,
            escape=tty,
        )
        result = machine.run()
    if result.status == STATUS_BROKEN_PIPE:
        return result.status  # quietly, as the shell's convention for a closed pipe
    if ns.json:
        import json  # only for --json: not on every run's start-up

        streams.write_text(json.dumps(result.to_json()) + "\n")
        return result.status
    if result.console_error:
        streams.notice(result.console_error)
    if result.prefault is not None and not ns.quiet:
        streams.notice(f"prefault: {result.prefault.summary()}")
    if result.crash is not None:
        streams.notice(result.reason)
        if ns.verbose and result.crash.regs:
            streams.notice("registers: " + " ".join(f"{k}={v:#x}" for k, v in result.crash.regs.items()))
    elif not ns.quiet:
        streams.notice(result.summary())
    return result.status


def _stderr_is_tty() -> bool:
    import sys

    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (OSError, ValueError):
        return False
