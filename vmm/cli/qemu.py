"""``vmm qemu ARGS...`` (and the ``vmm-qemu`` command): QEMU's command line, for the subset
test harnesses use, mapped onto ``vmm run`` (:mod:`vmm.qemu_args` does the mapping)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from vmm.cli import streams


def add_parser(sub: Any) -> None:
    qemu = sub.add_parser(
        "qemu",
        help="run with qemu-system-x86_64's options (the subset test harnesses use)",
        description="Accept qemu-system-x86_64 options (-kernel, -append, -initrd, -m, -smp, -cpu, -machine, "
        "-accel, -enable-kvm, -nodefaults, -nographic, -display none, -serial stdio, -no-reboot, "
        "-device isa-debug-exit, -fw_cfg) and run the kernel as `vmm run` would.",
        prefix_chars="+",  # every argument, dashes included, belongs to QEMU's syntax
    )
    qemu.add_argument("qemu_args", nargs=argparse.REMAINDER, help="QEMU options")
    qemu.set_defaults(handler=cmd_qemu)


def cmd_qemu(ns: argparse.Namespace) -> int:
    return run_qemu(ns.qemu_args)


def run_qemu(argv: Sequence[str]) -> int:
    """Translate ``argv`` and run it as ``vmm run`` (InputError for what is not supported)."""
    import os

    from vmm.cli import build_parser, dispatch
    from vmm.qemu_args import answer_query, translate

    answer = answer_query(list(argv))  # -version, -help, -device ?: what harnesses probe
    if answer is not None:
        streams.write_text(answer)
        return 0
    translation = translate(list(argv))
    if not os.path.exists(translation.kernel):
        # QEMU's wording: harnesses (kvm-unit-tests) probe with a missing kernel and look for it.
        streams.notice(f"could not open kernel file '{translation.kernel}': No such file or directory")
        return 1
    for warning in translation.warnings:
        streams.notice(warning)
    # QEMU has no run-time limit; the harness enforces its own.
    ns = build_parser().parse_args(["run", "-q", "--timeout=0", *translation.run_args])
    return dispatch(ns)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmm-qemu`` console script."""
    import sys

    from vmm.cli import dispatch

    ns = argparse.Namespace(handler=lambda _ns: run_qemu(sys.argv[1:] if argv is None else argv))
    return dispatch(ns)
