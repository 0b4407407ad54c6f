"""KVM failure paths (issue 9, defects 2 and 3): a failing KVM_RUN is a KvmError with its
errno, and a kick never kills the process, in cffi ABI mode off the main thread too."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kvm_abi
from kvm_abi import KvmError
from vmm import Kvm, Machine, MachineConfig

ROOT = Path(__file__).resolve().parent.parent
INVALID_SYNC_REGS = 1 << 31  # no KVM_SYNC_X86_* bit: KVM_RUN answers EINVAL before entering the guest


def test_ehwpoison_is_defined_once_with_the_linux_number():
    assert kvm_abi.EHWPOISON == 133  # include/uapi/asm-generic/errno.h, x86 Linux
    err = KvmError(kvm_abi.EHWPOISON, "KVM_RUN", "vcpu0")
    assert err.errno_name == "EHWPOISON"
    assert str(err).startswith("KVM_RUN failed on vcpu0: EHWPOISON (")


@pytest.mark.kvm
def test_a_failing_kvm_run_raises_kvm_error_with_its_errno():
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(gpa=0, size=1 << 20, backing="anon")
        vcpu = vm.create_vcpu(0)
        vcpu.run_struct.kvm_valid_regs = INVALID_SYNC_REGS
        with pytest.raises(KvmError) as info:
            vcpu.run()
        assert (info.value.errno, info.value.ioctl, info.value.target) == (errno.EINVAL, "KVM_RUN", "vcpu0")


@pytest.mark.kvm
def test_the_kvm_backend_reports_a_failing_kvm_run_as_a_crash(guest):
    def break_sync_regs(machine: Machine) -> None:
        for runner in machine.vcpus:
            runner.vcpu.run_struct.kvm_valid_regs = INVALID_SYNC_REGS  # type: ignore[attr-defined]

    config = MachineConfig.parse(image=guest("hello64.elf"), mem="16M", backend="kvm")
    result = Machine(config, before_boot=break_sync_regs).run(timeout=60)
    assert result.status == 4, result.reason
    assert result.crash is not None and "KVM_RUN failed on vcpu0: EINVAL" in result.crash.detail


def run_abi_mode(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with the compiled cffi module refused (VMM_CFFI=abi),
    as on an install without a C compiler."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "VMM_CFFI": "abi"},
        check=False,
    )


KILLED_BY_KICK = -int(signal.SIGRTMIN)


@pytest.mark.kvm
def test_abi_mode_machine_off_the_main_thread_is_a_clear_error_not_a_death():
    proc = run_abi_mode(
        """
        import threading
        import kvm_abi
        from vmm import Machine, MachineConfig
        from vmm.errors import ConfigError

        assert not kvm_abi.COMPILED
        outcome = []

        def run():
            config = MachineConfig.parse(image="guests/spin64.elf", mem="16M", backend="kvm")
            try:
                outcome.append(Machine(config).run(timeout=1).status)
            except ConfigError as e:
                outcome.append(str(e))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        print(outcome[0])
        """
    )
    assert proc.returncode != KILLED_BY_KICK, "the kick signal's default action killed the process"
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert "\n" not in message and "main thread" in message and "compiled module" in message


@pytest.mark.kvm
def test_abi_mode_machine_on_the_main_thread_runs_and_is_stopped_by_the_timeout():
    proc = run_abi_mode(
        """
        import kvm_abi
        from vmm import Machine, MachineConfig

        assert not kvm_abi.COMPILED
        print(Machine(MachineConfig.parse(image="guests/spin64.elf", mem="16M", backend="kvm")).run(timeout=1).status)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "124"


@pytest.mark.kvm
def test_abi_mode_kick_without_a_handler_sets_immediate_exit_and_sends_no_signal():
    proc = run_abi_mode(
        """
        import threading
        import kvm_abi
        from vmm import Kvm
        from vmm.vcpu import kick_handler_installed

        assert not kvm_abi.COMPILED and not kick_handler_installed()
        with Kvm() as kvm, kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            bound, release = threading.Event(), threading.Event()

            def vcpu_thread():  # stands in for a vCPU thread: bound, then waiting
                vcpu.bind_thread()
                bound.set()
                release.wait()
                vcpu.unbind_thread()

            thread = threading.Thread(target=vcpu_thread)
            thread.start()
            bound.wait()
            vcpu.kick()  # from the main thread, at a bound thread, with no handler anywhere
            release.set()
            thread.join()
            print(vcpu.run_struct.immediate_exit)
        """
    )
    assert proc.returncode != KILLED_BY_KICK, "kick() sent the signal without a handler"
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
