"""The PC platform on KVM: in-kernel interrupt controllers by default, `--irqchip off` for a
bare machine, application processors that wait for INIT/SIPI, and "all vCPUs halted" still
detected although HLT no longer exits to userspace."""

from __future__ import annotations

import json

import pytest
from vmm_cli import vmm

from vmm.backends.kvm import cpuid_for_vcpu
from vmm.backends.kvm_idle import halted_for_good

HLT = bytes.fromhex("f4")  # real mode: hlt (interrupts off: nothing can wake it)
STI_HLT = bytes.fromhex("fbf4")  # sti; hlt: waits for an interrupt that never comes
# mov eax, 1; cpuid; mov eax, edx; shr eax, 9; and al, 1; out 0xf4, al  (exit value = CPUID.1:EDX.APIC)
APIC_BIT = bytes.fromhex("66b8010000000fa26689d066c1e8092401e6f4")
EXIT_5 = bytes.fromhex("b005e6f4")  # mov al, 5; out 0xf4, al
# CPUID leaf 1 feature bits (Intel SDM vol. 2A, CPUID): EDX.APIC, ECX.x2APIC, ECX.TSC-deadline.
CPUID1_EDX_APIC = 1 << 9
CPUID1_ECX_X2APIC = 1 << 21
CPUID1_ECX_TSC_DEADLINE = 1 << 24
RFLAGS_IF = 1 << 9


def run_json(*args: str) -> tuple[int, dict]:
    proc = vmm("run", *args, "--backend", "kvm", "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def image(tmp_path, name: str, code: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(code)
    return str(path)


def test_halted_for_good_is_halted_with_interrupts_off_or_never_started():
    from kvm_abi import MpState

    assert halted_for_good(MpState.HALTED, 0x2)
    assert not halted_for_good(MpState.HALTED, 0x2 | RFLAGS_IF)  # waits for an interrupt
    assert halted_for_good(MpState.UNINITIALIZED, 0x2 | RFLAGS_IF)  # an AP nobody started
    assert not halted_for_good(MpState.RUNNABLE, 0x2)


@pytest.mark.kvm
def test_cpuid_offers_the_apic_only_with_the_irqchip(kvm):
    supported = kvm.get_supported_cpuid()

    def leaf1(cpuid):
        return next(cpuid.entries[i] for i in range(cpuid.nent) if cpuid.entries[i].function == 1)

    on = leaf1(cpuid_for_vcpu(supported, 2, irqchip=True, tsc_deadline=True))
    assert on.edx & CPUID1_EDX_APIC and on.ecx & CPUID1_ECX_X2APIC and on.ecx & CPUID1_ECX_TSC_DEADLINE
    assert on.ebx >> 24 == 2  # the vCPU's APIC id
    off = leaf1(cpuid_for_vcpu(supported, 0, irqchip=False))
    assert not off.edx & CPUID1_EDX_APIC and not off.ecx & (CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE)


@pytest.mark.kvm
@pytest.mark.parametrize(("irqchip", "value"), [("on", 1), ("off", 0)])
def test_the_guest_sees_a_local_apic_only_with_the_irqchip(tmp_path, irqchip, value):
    status, result = run_json(image(tmp_path, "apic.bin", APIC_BIT), "--irqchip", irqchip)
    assert result["exit_value"] == value, result["reason"]
    assert status == (value << 1) | 1


@pytest.mark.kvm
@pytest.mark.parametrize("irqchip", ["on", "off"])
def test_hlt_with_interrupts_off_ends_the_run_as_halted(tmp_path, irqchip):
    status, result = run_json(image(tmp_path, "hlt.bin", HLT), "--irqchip", irqchip, "--timeout", "20")
    assert status == 0 and result["reason"] == "all vCPUs halted"


@pytest.mark.kvm
def test_hlt_waiting_for_an_interrupt_is_not_halted_for_good(tmp_path):
    status, result = run_json(image(tmp_path, "sti-hlt.bin", STI_HLT), "--timeout", "1")
    assert status == 124, result["reason"]


@pytest.mark.kvm
def test_without_the_irqchip_hlt_exits_whatever_the_interrupt_flag(tmp_path):
    status, result = run_json(image(tmp_path, "sti-hlt.bin", STI_HLT), "--irqchip", "off", "--timeout", "20")
    assert status == 0, result["reason"]
    assert result["exits"][0]["hlt"] == 1


@pytest.mark.kvm
@pytest.mark.parametrize("irqchip", ["on", "off"])
def test_application_processors_nobody_starts_do_not_delay_the_end(tmp_path, irqchip):
    status, result = run_json(image(tmp_path, "hlt.bin", HLT), "--vcpus", "3", "--irqchip", irqchip, "--timeout", "20")
    assert status == 0 and result["reason"] == "all vCPUs halted"
    status, result = run_json(image(tmp_path, "exit5.bin", EXIT_5), "--vcpus", "3", "--irqchip", irqchip)
    assert status == 11 and result["vcpus"] == 3
    # only the BSP ran: the APs of a PC-convention image wait for INIT/SIPI
    assert result["exits"][0]["io"] == 1
    assert all(e["io"] == 0 for e in result["exits"][1:])


@pytest.mark.kvm
@pytest.mark.parametrize("irqchip", ["on", "off"])
def test_a_console_with_its_transmit_interrupt_enabled_drives_irq_4(tmp_path, irqchip):
    # mov dx, 0x3f9; mov al, 2; out dx, al (IER: THRI); mov dx, 0x3f8; mov al, 'k'; out dx, al;
    # xor al, al; out 0xf4, al. The UART raises and lowers IRQ 4 through KVM_IRQ_LINE.
    code = bytes.fromhex("baf903b002eebaf803b06bee30c0e6f4")
    status, result = run_json(image(tmp_path, "thri.bin", code), "--irqchip", irqchip)
    assert status == 1 and result["console"] == "k", result["reason"]
