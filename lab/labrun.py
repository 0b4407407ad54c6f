"""Run one command inside the nested real-kernel lab and exit with its status.

``lab/run [options] -- CMD ARGS...`` builds the lab if needed (:mod:`labbuild`), boots it
with QEMU (TCG, ``-cpu EPYC,+svm,+npt``), and runs CMD inside a chroot of the host root
(read-only over 9p, with a RAM overlay on top) in the same working directory as on the
host.  The command's output is streamed to stdout; ``lab/run`` exits with the command's
exit status, or with :data:`EXIT_TIMEOUT` / :data:`EXIT_LAB` and one ``lab: ...`` line on
stderr when the lab timed out or could not be built or booted.

Serial ports: ttyS0 carries the command's output (QEMU's stdout), ttyS1 the kernel
console (a log file, kept as ``.cache/lab/last-console.log``), ttyS2 one status line.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn

from labbuild import CACHE, Lab, LabError, ensure_lab, last_line, log
from labkernel import DEFAULT_SERIES, SERIES

EXIT_TIMEOUT = 124
EXIT_LAB = 125
#: x86's COMMAND_LINE_SIZE is 2048 bytes including the NUL; keep a margin.
CMDLINE_BUDGET = 2000
#: Kernel arguments: console on ttyS1, reboot (so QEMU exits) on panic, and a few knobs
#: that save boot time or false alarms under slow TCG emulation.
BASE_CMDLINE = (
    "console=ttyS1",
    "panic=-1",
    "loglevel=4",
    "mitigations=off",
    "nokaslr",
    "nowatchdog",
    "cryptomgr.notests",
)
QEMU_CPU = "EPYC,+svm,+npt"
VIRTFS = "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_PREFIXES = ("VMM_", "LAB_")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STATUS_RE = re.compile(r"LAB-(EXIT-STATUS|SETUP-FAILED)=(.*)")
QEMU_EXIT_GRACE = 30.0


@dataclass(frozen=True)
class Options:
    """What to run and how."""

    command: list[str]
    timeout: float
    mem: int
    smp: int
    private: bool
    kernel: str | None
    env: dict[str, str]
    append: list[str]
    verbose: bool


class Failure(Exception):
    """The lab failed (not the command): exit with ``code`` after one ``lab:`` line."""

    def __init__(self, code: int, message: str) -> None:
        """Remember the exit code and the message."""
        super().__init__(message)
        self.code = code


def inner_env(extra: dict[str, str], tty: bool) -> dict[str, str]:
    """The environment of the command inside: minimal, plus TERM (on a terminal), VMM_*/LAB_* and --env."""
    env = {
        "PATH": os.environ.get("PATH", DEFAULT_PATH),
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if tty and "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    for name, value in os.environ.items():
        if name.startswith(PASSED_PREFIXES):
            env[name] = value
    env.update(extra)
    return {name: value for name, value in env.items() if NAME_RE.match(name)}


def inner_script(command: Sequence[str], cwd: str, env: dict[str, str]) -> str:
    """The POSIX sh script that runs the command inside the chroot."""
    quote = shlex.quote
    lines = [f"export {name}={quote(value)}" for name, value in sorted(env.items())]
    lines.append(f"cd {quote(cwd)} || {{ echo {quote(f'lab: cannot enter {cwd} inside the lab')}; exit 125; }}")
    lines.append("exec " + " ".join(quote(arg) for arg in command))
    return "\n".join(lines) + "\n"


def kernel_cmdline(script: str, workdir: Path, append: Sequence[str], tty: bool) -> str:
    """The kernel command line; the script travels on it when it fits, else as a file."""
    base = [*BASE_CMDLINE, f"lab.tty={int(tty)}", *append]
    encoded = base64.b64encode(script.encode()).decode()
    line = " ".join([*base, f"lab.cmd={encoded}"])
    if len(line) <= CMDLINE_BUDGET:
        return line
    path = workdir / "cmd.sh"
    path.write_text(script)
    line = " ".join([*base, f"lab.script={path}"])
    if len(line) > CMDLINE_BUDGET or any(c.isspace() for c in str(path)):
        raise Failure(EXIT_LAB, "the kernel command line is too long (too many --append?)")
    return line


def qemu_command(lab: Lab, opts: Options, cmdline: str, workdir: Path) -> list[str]:
    """The QEMU invocation: TCG, SVM+NPT CPU, host root over 9p, three serial ports."""
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-cpu", QEMU_CPU,
        "-smp", str(opts.smp),
        "-m", str(opts.mem),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(lab.kernel),
        "-initrd", str(lab.initrd),
        "-append", cmdline,
        "-virtfs", VIRTFS,
        "-serial", "stdio",
        "-serial", f"file:{workdir / 'console.log'}",
        "-serial", f"file:{workdir / 'status'}",
    ]  # fmt: skip


def pump(proc: subprocess.Popen[bytes], out: BinaryIO, deadline: float) -> bool:
    """Copy QEMU's stdout to ``out`` until it ends; False if the deadline passed."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    writing = True
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if writing:
            try:
                out.write(chunk)
                out.flush()
            except BrokenPipeError:
                writing = False
    else:
        return False
    try:
        proc.wait(timeout=max(0.0, min(QEMU_EXIT_GRACE, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        return False
    return True


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill QEMU if it still runs and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def qemu_error(path: Path) -> str:
    """QEMU's last complaint, ignoring its warnings about CPU features TCG lacks."""
    lines = path.read_text(errors="replace").splitlines()
    return last_line("\n".join(line for line in lines if "warning:" not in line))


def read_status(path: Path) -> tuple[str, str] | None:
    """The last status line the lab's init wrote, as (kind, value)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    found = [(match[1], match[2]) for match in map(STATUS_RE.search, text.splitlines()) if match]
    return found[-1] if found else None


def keep_console_log(workdir: Path, verbose: bool) -> Path:
    """Save the kernel console and QEMU's stderr as ``.cache/lab/last-console.log``."""
    text = ""
    for name in ("console.log", "qemu.stderr"):
        with open(workdir / name, errors="replace") as handle:
            body = handle.read()
        if body.strip():
            text += f"===== {name} =====\n{body}\n"
    dest = CACHE / "last-console.log"
    tmp = workdir / "last-console.log"
    tmp.write_text(text)
    shutil.move(tmp, dest)
    if verbose:
        sys.stderr.write(text)
    return dest


def boot(lab: Lab, opts: Options, workdir: Path) -> int:
    """Boot the lab once, stream the command's output, and return its exit status."""
    tty = sys.stdout.isatty()
    script = inner_script(opts.command, os.getcwd(), inner_env(opts.env, tty))
    append = ["loglevel=7", *opts.append] if opts.verbose else opts.append
    cmdline = kernel_cmdline(script, workdir, append, tty)
    (workdir / "console.log").touch()
    with open(workdir / "qemu.stderr", "wb") as stderr:
        try:
            proc = subprocess.Popen(
                qemu_command(lab, opts, cmdline, workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        except OSError as exc:
            raise Failure(EXIT_LAB, f"cannot start qemu-system-x86_64: {exc}") from exc
        try:
            finished = pump(proc, sys.stdout.buffer, time.monotonic() + opts.timeout)
        finally:
            stop(proc)
    logfile = keep_console_log(workdir, opts.verbose)
    if not finished:
        raise Failure(EXIT_TIMEOUT, f"timed out after {opts.timeout:g} s (console log: {logfile})")
    status = read_status(workdir / "status")
    if status is None:
        reason = qemu_error(workdir / "qemu.stderr")
        detail = f"qemu exit status {proc.returncode}" + (f": {reason}" if reason else "")
        raise Failure(EXIT_LAB, f"the lab ended without reporting a status ({detail}; console log: {logfile})")
    kind, value = status
    if kind == "SETUP-FAILED":
        raise Failure(EXIT_LAB, f"lab setup failed: {value} (console log: {logfile})")
    try:
        return int(value)
    except ValueError as exc:
        raise Failure(EXIT_LAB, f"unreadable exit status {value!r}") from exc


def parse_args(argv: Sequence[str]) -> Options:
    """Parse ``lab/run [options] -- CMD ARGS...``."""
    parser = argparse.ArgumentParser(
        prog="lab/run",
        description="Run CMD inside the nested real-kernel lab (a KVM with nested paging).",
        epilog=f"Exit status: CMD's, or {EXIT_TIMEOUT} on a timeout, or {EXIT_LAB} when the "
        "lab could not be built or booted (with one 'lab: ...' line on stderr).",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--mem", type=int, default=1024, help="guest MiB (default 1024)")
    parser.add_argument("--smp", type=int, default=1, help="guest CPUs (default 1)")
    parser.add_argument(
        "--private",
        action="store_true",
        help="use kvm modules rebuilt with CONFIG_KVM_SW_PROTECTED_VM=y",
    )
    parser.add_argument(
        "--kernel",
        choices=sorted(SERIES),
        default=None,
        help=f"kernel series to boot (default {DEFAULT_SERIES}; 6.12 with --private)",
    )
    parser.add_argument(
        "--env", "-e", action="append", default=[], metavar="NAME=VALUE",
        help="set a variable inside (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--append", action="append", default=[], metavar="ARG",
        help="extra kernel argument, e.g. kvm_amd.npt=0 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="log kernel info messages and print the console log afterwards"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (lab/run [options] -- CMD ARGS...)")
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not NAME_RE.match(name):
            parser.error(f"--env wants NAME=VALUE, got {item!r}")
        env[name] = value
    if args.timeout <= 0 or args.mem < 64 or args.smp < 1:
        parser.error("--timeout must be > 0, --mem >= 64 and --smp >= 1")
    return Options(
        command=command,
        timeout=args.timeout,
        mem=args.mem,
        smp=args.smp,
        private=args.private,
        kernel=args.kernel,
        env=env,
        append=args.append,
        verbose=args.verbose,
    )


def on_sigterm(signum: int, _frame: object) -> NoReturn:
    """Turn SIGTERM into an exit that runs the clean-up code."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> int:
    """Entry point of ``lab/run``."""
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="lab-run-"))
    try:
        lab = ensure_lab(private=opts.private, kernel=opts.kernel)
        return boot(lab, opts, workdir)
    except LabError as exc:
        log(str(exc))
        return EXIT_LAB
    except Failure as exc:
        log(str(exc))
        return exc.code
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
