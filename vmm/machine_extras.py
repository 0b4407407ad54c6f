"""What a machine attaches only when asked: pre-population of guest RAM (``--prefault``),
KVM's fault counter (``--count-faults``) and the gdb stub (``--gdb``). Each is imported
only then, so a plain ``vmm run`` loads none of their machinery."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from vmm.backends.base import Backend, VcpuRunner
from vmm.config import MachineConfig
from vmm.errors import Unavailable


def prefault_ram(backend: Backend, ranges: list[tuple[int, int]], config: MachineConfig, *, progress: bool) -> Any:
    """Pre-populate ``ranges`` of guest RAM before any vCPU exists; the report."""
    from vmm.prefault import prefault_backend

    controllers = getattr(backend, "create_interrupt_controllers", None)
    if controllers is not None:  # before the kernel strategies' helper vCPUs
        controllers()
    return prefault_backend(
        backend, ranges, strategy=config.prefault or "auto", threads=config.prefault_threads, progress=progress
    )


def fault_counter(backend: Backend, stack: contextlib.ExitStack) -> Any:
    """A running FaultCounter, closed with the machine; vCPU threads join it as they
    start, so pre-population and building are not counted."""
    from vmm.faults import FaultCounter

    if backend.name != "kvm":
        raise Unavailable(f"--count-faults counts KVM's page faults; the {backend.name} backend takes none")
    return stack.enter_context(FaultCounter())


def gdb_stub(
    backend: Backend,
    vcpus: Sequence[VcpuRunner],
    config: MachineConfig,
    *,
    kill: Callable[[], None],
    notice: Callable[[str], None],
    stack: contextlib.ExitStack,
) -> Any:
    """A listening gdb stub attached to every vCPU (KVM only: KVM_SET_GUEST_DEBUG), closed
    with the machine; ``kill`` ends the run when gdb kills the guest."""
    from kvm_abi import Cap
    from vmm.gdb.protocol import parse_address
    from vmm.gdb.stub import GdbStub

    if backend.name != "kvm":
        raise Unavailable(f"--gdb needs the KVM backend (KVM_SET_GUEST_DEBUG); the {backend.name} backend has none")
    vm = backend.vm  # type: ignore[attr-defined]
    if not vm.check_extension(Cap.SET_GUEST_DEBUG):
        raise Unavailable("--gdb: this KVM lacks KVM_CAP_SET_GUEST_DEBUG", "SET_GUEST_DEBUG")
    assert config.gdb is not None
    stub = GdbStub(
        parse_address(config.gdb),
        list(vcpus),  # type: ignore[arg-type]
        backend.memory,
        wait=config.gdb_wait,
        kill=kill,
        debug_flags=vm.check_extension(Cap.SET_GUEST_DEBUG2),
    )
    stack.callback(stub.close)
    for runner in vcpus:
        runner.debug = stub.session  # type: ignore[attr-defined]
    held = "; the guest waits for gdb to continue it" if config.gdb_wait else ""
    notice(f"gdb stub listening on {stub.host}:{stub.port}{held}")
    return stub
