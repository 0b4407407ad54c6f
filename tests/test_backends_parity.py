"""Every bundled guest gives the same console output and exit status on both backends.

The table below is guests/README.md's list of documented results. Each row runs once per
backend (the plugin's ``vmm_backend`` parameter: KVM where usable, the emulator always),
and where KVM is usable the two runs are also compared with each other, crash RIP
included. The CLI's fallback to the emulator when /dev/kvm is missing is checked too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile
from vmm_cli import vmm

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"
UD2 = b"\x0f\x0b"


@dataclass(frozen=True)
class Case:
    """A guest, the options it runs with, and what guests/README.md says it does."""

    image: str
    console: bytes
    status: int
    options: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    sort_lines: bool = False  # vCPUs print in any order
    crash_at_ud2: bool = False  # the crash RIP is the guest's ud2
    crash_detail: str = ""

    @property
    def name(self) -> str:
        return self.id or self.image


MEM = 16 << 20  # every case runs with --mem 16M


def first_page_above(image: str) -> int:
    """The first 4 KiB page above the image's last loaded byte: where memtouch and readpages
    start by default (guests/README.md), from the ELF's program headers."""
    with (GUESTS / image).open("rb") as f:
        end = max(int(s["p_paddr"]) + int(s["p_memsz"]) for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD")
    return (end + 0xFFF) & ~0xFFF


def memtouch_console(passes: int) -> bytes:
    """memtouch writes gpa + pass to every page above itself each pass and sums what it reads
    back (guests/README.md, memtouch64.S): its line, computed from that contract."""
    pages = range(first_page_above("memtouch64.elf"), MEM, 0x1000)
    checksum = sum(gpa + n for n in range(passes) for gpa in pages) & ((1 << 64) - 1)
    return f"memtouch: {len(pages)} pages x {passes} passes, checksum {checksum:#018x}\n".encode()


def readpages_console() -> bytes:
    """readpages sums one qword per page from above itself to the end of RAM: fresh RAM
    reads zero."""
    base = first_page_above("readpages64.elf")
    return f"readpages: {(MEM - base) // 0x1000} pages from {base:#018x}, checksum {0:#018x}\n".encode()


CASES = [
    Case("hello16.bin", b"hello from real mode\n", 1),
    Case("hello32.elf", b"hello from protected mode\n", 1),
    Case("hello64.elf", b"hello from long mode\n", 1),
    Case("user64.elf", b"hello from user mode\n", 1),
    Case("memtouch64.elf", memtouch_console(2), 1, {"args": {"passes": "2"}}),
    Case("readpages64.elf", readpages_console(), 1),
    Case("pio-loop64.elf", b"", 1, {"args": {"count": "500"}}, id="pio-loop64-ring0"),
    Case("pio-loop64.elf", b"", 1, {"args": {"count": "500"}, "mode": "user"}, id="pio-loop64-ring3"),
    Case("smp64.elf", b"cpu 0 of 3\ncpu 1 of 3\ncpu 2 of 3\n", 1, {"vcpus": 3}, sort_lines=True),
    Case("spin64.elf", b"", 124, {"timeout": 0.5}),
    Case("uartecho64.elf", b"echo: ready\n", 124, {"timeout": 0.5}),  # no input: it polls LSR.DR on
    Case("triple-fault.bin", b"triple fault next\n", 4, crash_at_ud2=True),
    Case("ud64.elf", b"invalid opcode next\n", 4, crash_at_ud2=True),
    Case("mmio64.elf", b"mmio read 0x00000000ffffffff\n", 1),
    Case("mmio64.elf", b"", 4, {"strict": True}, id="mmio64-strict", crash_detail="MMIO read at 0xd0000000"),
]


def _console(case: Case, console: bytes) -> bytes:
    return b"".join(sorted(console.splitlines(keepends=True))) if case.sort_lines else console


def ud2_address(path: Path) -> int:
    """Guest-physical address of the image's only ud2: flat binaries load at 0x7c00, ELF
    images where their program headers say."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        assert data.count(UD2) == 1, f"{path.name}: expected one ud2"
        return 0x7C00 + data.index(UD2)
    with path.open("rb") as f:
        for segment in ELFFile(f).iter_segments():
            if segment["p_type"] == "PT_LOAD" and UD2 in segment.data():
                return int(segment["p_paddr"]) + segment.data().index(UD2)
    raise AssertionError(f"{path.name}: no ud2 in any loadable segment")


def run_case(machine_factory: Any, case: Case, **extra: Any) -> Any:
    options = {"mem": f"{MEM >> 20}M", **case.options, **extra}
    return machine_factory(str(GUESTS / case.image), **options)


def test_every_bundled_guest_has_a_documented_result() -> None:
    images = {p.name for p in GUESTS.iterdir() if p.suffix in (".bin", ".elf")}
    assert images == {c.image for c in CASES}, "add the new guest to CASES (guests/README.md says what it does)"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bundled_guest_gives_its_documented_result(machine_factory, vmm_backend, case: Case) -> None:
    result = run_case(machine_factory, case)
    assert result.backend == vmm_backend
    assert _console(case, result.console) == case.console, result.reason
    assert result.status == case.status, result.reason
    if case.status == 4:
        assert result.crash is not None and result.crash.vcpu == 0
        if case.crash_at_ud2:
            assert result.crash.rip == ud2_address(GUESTS / case.image), result.reason
        assert case.crash_detail in result.crash.detail


@pytest.mark.kvm
@pytest.mark.emulator
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kvm_and_the_emulator_agree(machine_factory, case: Case) -> None:
    kvm = run_case(machine_factory, case, backend="kvm")
    emulated = run_case(machine_factory, case, backend="emulator")
    assert (kvm.backend, emulated.backend) == ("kvm", "emulator")
    assert _console(case, emulated.console) == _console(case, kvm.console)
    assert emulated.status == kvm.status
    assert emulated.exit_value == kvm.exit_value
    assert (emulated.crash is None) == (kvm.crash is None)
    if kvm.crash is not None and emulated.crash is not None:
        assert emulated.crash.rip == kvm.crash.rip
        assert emulated.crash.vcpu == kvm.crash.vcpu


# --- the CLI without /dev/kvm ---------------------------------------------------------------


NO_KVM = {"VMM_KVM_DEVICE": "/nonexistent"}


@pytest.mark.emulator
def test_without_kvm_vmm_run_falls_back_to_the_emulator_saying_why_in_one_line() -> None:
    proc = vmm("run", str(GUESTS / "hello64.elf"), "-q", env=NO_KVM)
    assert proc.stdout == "hello from long mode\n"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmm: /nonexistent: no such device (")
    assert lines[0].endswith("; running on the in-process emulator")
    assert proc.returncode == 1


@pytest.mark.emulator
def test_without_kvm_the_summary_names_the_emulator() -> None:
    proc = vmm("run", str(GUESTS / "hello64.elf"), env=NO_KVM)
    lines = proc.stderr.splitlines()
    assert [line for line in lines if "running on the in-process emulator" in line] == lines[:1]
    assert "on emulator" in lines[-1]
    assert proc.returncode == 1


def test_without_kvm_forcing_the_kvm_backend_is_a_one_line_error() -> None:
    proc = vmm("run", str(GUESTS / "hello64.elf"), "--backend", "kvm", env=NO_KVM)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmm: /nonexistent: no such device")
    assert "emulator" not in lines[0]
    assert proc.returncode == 2
