"""The PC-convention guests (guests/pc/: Multiboot v1 ELF32 images built the way QEMU test
kernels are) on both backends, their broken twins, and QEMU itself as the oracle.

Every expected line is computed from the configuration (guests/README.md, README "Images
built for QEMU"): the command line is QEMU's ``"<image> <append>"``, a module's string is
``--module FILE=STRING``'s STRING (default: FILE), the memory map is the PC's.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from vmm_cli import vmm

ROOT = Path(__file__).resolve().parent.parent
PC = ROOT / "guests" / "pc"
IMAGES = ("mbinfo", "smp", "apic-timer", "exceptions", "realmode8000")
MiB, GiB = 1 << 20, 1 << 30
MB_MAGIC = struct.pack("<I", 0x1BADB002)
EBDA, BIOS = 0x9FC00, 0xF0000
RING0_EMULATED = (
    "this host's KVM (kvm_pvm) runs guest ring 0 in KVM's instruction emulator, "
    "which has no int3 or int n (KVM internal error)"
)
PVM = os.path.isdir("/sys/module/kvm_pvm")
ALL_CASES = ("de", "ud", "gp", "pf", "bp", "int")
KVM_HERE_CASES = ("de", "ud", "gp", "pf") if PVM else ALL_CASES
TSC_LINES = ("timer: tsc-deadline 1 interrupt", "timer: tsc-deadline not offered (CPUID.1:ECX[24] clear)")
QEMU = shutil.which("qemu-system-x86_64")
QEMU_COMMON = ("-nodefaults", "-nographic", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4")
QEMU_PC = ("-M", "pc", "-fw_cfg", "name=etc/sercon-port,string=0")  # SeaBIOS: no banner on COM1
QEMU_MICROVM = ("-M", "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (apt-get install qemu-system-x86)")


def image(name: str) -> str:
    """The image's path as the tests pass it (relative to the repo, where vmm runs)."""
    return f"guests/pc/{name}.elf"


def run(backend: str, name: str, *options: str) -> subprocess.CompletedProcess[str]:
    return vmm("run", "-q", "--backend", backend, "--timeout", "60", image(name), *options)


def console(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout.splitlines()


def pc_memory_map(mem: int) -> list[tuple[int, int, int]]:
    """(base, length, type) of the PC map for ``mem`` bytes of RAM (3 GiB below the hole)."""
    low = min(mem, 3 * GiB)
    entries = [(0, EBDA, 1), (EBDA, 0xA0000 - EBDA, 2), (BIOS, MiB - BIOS, 2), (MiB, low - MiB, 1)]
    if mem > 3 * GiB:
        entries.append((4 * GiB, mem - 3 * GiB, 1))
    return entries


def mmap_line(base: int, length: int, kind: int) -> str:
    return f"mmap base={base:#018x} len={length:#018x} type={kind:x}"


def mbinfo_lines(mem: int, cmdline: str, modules: list[tuple[bytes, str]], loader: str = "vmm") -> list[str]:
    """What mbinfo prints; ``modules`` are (contents, string). Without modules vmm sets no
    module flag ("modules: none"); QEMU sets it with a count of 0."""
    lines = [f"mem_lower={EBDA // 1024} mem_upper={(min(mem, 3 * GiB) - MiB) // 1024}", f"cmdline={cmdline}"]
    lines.append(f"modules={len(modules)}" if modules else "modules: none")
    lines += [f"module {i}: string={s} size={len(d)} head={d[:8].hex()}" for i, (d, s) in enumerate(modules)]
    lines += [mmap_line(*entry) for entry in pc_memory_map(mem)]
    return [*lines, f"loader={loader}", "PASS mbinfo"]


def smp_lines(n: int) -> list[str]:
    ups = [f"cpu {i} up" for i in range(1, n)]
    return [f"smp: fw_cfg QEMU, {n} cpus, bsp apic id 0", *ups, f"smp: {n} cpus", "PASS smp"]


def exceptions_lines(cases: tuple[str, ...]) -> list[str]:
    return [*(f"PASS {c}" for c in cases), f"PASS exceptions: {len(cases)} cases"]


def same_timer(lines: list[str]) -> list[str]:
    """apic-timer's console with the TSC-deadline line (CPUID-dependent) checked, then blanked."""
    assert len(lines) == 3 and lines[1] in TSC_LINES, lines
    return [lines[0], "<tsc-deadline>", *lines[2:]]


def skip_ring0_gaps(backend: str, cases: tuple[str, ...]) -> None:
    if backend == "kvm" and PVM and {"bp", "int"} & set(cases):
        pytest.skip(f"int3/int n at ring 0: {RING0_EMULATED}")


# --- the images themselves ---------------------------------------------------------------


def test_every_pc_source_has_its_image():
    assert {p.stem for p in PC.glob("*.S")} == set(IMAGES)
    assert {p.stem for p in PC.glob("*.elf")} == set(IMAGES)


@pytest.mark.parametrize("name", IMAGES)
def test_image_is_a_multiboot_elf32_with_one_header_in_its_first_8k(name):
    data = (PC / f"{name}.elf").read_bytes()
    ident, e_type, e_machine, _, e_entry, e_phoff, *_ = struct.unpack_from("<16sHHIIII", data)
    assert ident[:5] == b"\x7fELF\x01" and e_type == 2 and e_machine == 3  # ELF32, EXEC, i386
    hits = [i for i in range(len(data) - 3) if data[i : i + 4] == MB_MAGIC]
    assert len(hits) == 1, f"the magic appears at {hits}: a loader scanning the file would see more than one"
    off = hits[0]
    magic, flags, checksum = struct.unpack_from("<III", data, off)
    assert off % 4 == 0 and off + 12 <= 8192
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0 and flags == 0x3  # page-align + memory info
    phnum = struct.unpack_from("<H", data, 44)[0]
    loads = [struct.unpack_from("<8I", data, e_phoff + 32 * i) for i in range(phnum)]
    loads = [(paddr, memsz) for kind, _, _, paddr, _, memsz, _, _ in loads if kind == 1]
    start, end = loads[0][0], max(p + m for p, m in loads)
    assert start <= e_entry < end
    if name == "realmode8000":  # below QEMU's Multiboot info at 0x9000
        assert start == 0x8000 and end <= 0x9000
    else:
        assert start == MiB


@pytest.fixture
def rebuilt(rebuilt_guests: Path) -> Path:
    return rebuilt_guests / "pc"


@pytest.mark.parametrize("name", IMAGES)
def test_make_guests_rebuilds_the_image_byte_identical(rebuilt, name):
    built = rebuilt / f"{name}.elf"
    assert built.exists(), f"`make guests` did not build guests/pc/{name}.elf: the Makefile needs the guests/pc rules"
    assert built.read_bytes() == (PC / f"{name}.elf").read_bytes(), f"guests/pc/{name}.elf differs from a rebuild"


# --- on the VMM, each backend ------------------------------------------------------------


def test_mbinfo_without_options(vmm_backend):
    proc = run(vmm_backend, "mbinfo")
    assert console(proc) == mbinfo_lines(64 * MiB, f"{image('mbinfo')} ", [])
    assert proc.returncode == 1


@pytest.mark.parametrize(("mem", "size"), [("96M", 96 * MiB), ("4G", 4 * GiB)])
def test_mbinfo_reports_command_line_modules_and_memory(vmm_backend, tmp_path, mem, size):
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(b"module one: more than eight bytes")
    second.write_bytes(bytes(range(256)) * 20 + b"tail")
    options = ["--mem", mem, "--append", "hello  world k=v", "--module", f"{first}=one two", "--module", str(second)]
    proc = run(vmm_backend, "mbinfo", *options)
    mods = [(first.read_bytes(), "one two"), (second.read_bytes(), str(second))]
    assert console(proc) == mbinfo_lines(size, f"{image('mbinfo')} hello  world k=v", mods)
    assert proc.returncode == 1


def test_mbinfo_through_the_python_api(machine_factory, vmm_backend, tmp_path):
    module = tmp_path / "m.bin"
    module.write_bytes(b"\x00\x01\x02")
    path = str(PC / "mbinfo.elf")
    result = machine_factory(path, mem="32M", append="api", modules=((str(module), None),))
    assert result.console.decode().splitlines() == mbinfo_lines(32 * MiB, f"{path} api", [(b"\0\1\2", str(module))])
    assert result.status == 1, result.reason


@pytest.mark.parametrize("vcpus", [1, 2, 3])
def test_smp_starts_every_ap_by_init_sipi_sipi(vmm_backend, vcpus):
    proc = run(vmm_backend, "smp", "--vcpus", str(vcpus))
    assert console(proc) == smp_lines(vcpus)
    assert proc.returncode == 1


@pytest.mark.parametrize("ticks", [None, 25])
def test_apic_timer_periodic_one_shot_and_tsc_deadline(vmm_backend, ticks):
    proc = run(vmm_backend, "apic-timer", *(["--append", f"ticks={ticks}"] if ticks else []))
    assert same_timer(console(proc)) == [
        f"timer: {ticks or 10} periodic, 1 one-shot",
        "<tsc-deadline>",
        "PASS apic-timer",
    ]
    assert proc.returncode == 1


@pytest.mark.parametrize("cases", [None, *((c,) for c in ALL_CASES), ("pf", "de", "gp")], ids=str)
def test_exceptions_are_delivered_through_the_idt(vmm_backend, cases):
    skip_ring0_gaps(vmm_backend, cases or ALL_CASES)
    proc = run(vmm_backend, "exceptions", *(["--append", "cases=" + ",".join(cases)] if cases else []))
    assert console(proc) == exceptions_lines(cases or ALL_CASES)
    assert proc.returncode == 1


def test_exceptions_names_an_unknown_case_and_fails(vmm_backend):
    proc = run(vmm_backend, "exceptions", "--append", "cases=de,zz")
    assert console(proc) == ["PASS de", "FAIL: zz: unknown case (cases= takes de,ud,gp,pf,bp,int)"]
    assert proc.returncode == 3  # exit value 1


def test_realmode8000_prints_from_real_mode(vmm_backend):
    proc = run(vmm_backend, "realmode8000")
    assert console(proc) == ["hello from real mode at 0x8000", "PASS realmode8000"]
    assert proc.returncode == 1


PARITY = [
    ("mbinfo", ["--append", "x", "--mem", "48M"]),
    ("smp", ["--vcpus", "3"]),
    ("apic-timer", ["--append", "ticks=5"]),
    ("exceptions", ["--append", "cases=" + ",".join(KVM_HERE_CASES)]),
    ("realmode8000", []),
]


@pytest.mark.parametrize(("name", "options"), PARITY, ids=[p[0] for p in PARITY])
def test_both_backends_print_the_same_and_exit_the_same(name, options):
    from vmm.backends import kvm_usable

    pytest.importorskip("unicorn", reason="needs the emulator backend")
    usable, why = kvm_usable()
    if not usable:
        pytest.skip(f"needs /dev/kvm: {why}")
    kvm, emu = run("kvm", name, *options), run("emulator", name, *options)
    fix = same_timer if name == "apic-timer" else list
    assert fix(console(kvm)) == fix(console(emu))
    assert kvm.returncode == emu.returncode == 1


# --- broken images and impossible configurations: one line, status 2 ----------------------


def _header_offset(data: bytes) -> int:
    return data.index(MB_MAGIC)


def _bad_checksum(data: bytearray) -> None:
    off = _header_offset(data) + 8
    data[off : off + 4] = struct.pack("<I", (struct.unpack_from("<I", data, off)[0] + 1) & 0xFFFFFFFF)


def _header_beyond_8k(data: bytearray) -> None:
    off = _header_offset(data)
    header = bytes(data[off : off + 12])
    data[off : off + 4] = bytes(4)
    data.extend(bytes(max(8192, -(-len(data) // 4) * 4) - len(data)))  # unused bytes after the ELF's end
    data.extend(header)


def _video_mode(data: bytearray) -> None:
    off = _header_offset(data)
    flags = struct.unpack_from("<I", data, off + 4)[0] | 0x4
    struct.pack_into("<II", data, off + 4, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [(_bad_checksum, "bad checksum"), (_header_beyond_8k, "beyond the first 8192 bytes"), (_video_mode, "video mode")],
    ids=["checksum", "beyond-8k", "video-mode"],
)
def test_broken_mbinfo_copies_are_refused(vmm_backend, tmp_path, edit, fragment):
    data = bytearray((PC / "mbinfo.elf").read_bytes())
    edit(data)
    broken = tmp_path / "broken.elf"
    broken.write_bytes(bytes(data))
    assert_refused(vmm("run", "--backend", vmm_backend, str(broken)), fragment)


def test_a_module_larger_than_ram_is_refused(vmm_backend, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(2 * MiB))
    assert_refused(run(vmm_backend, "mbinfo", "--mem", "2M", "--module", str(big)), "does not fit")


def test_an_append_longer_than_4096_bytes_is_refused(vmm_backend):
    assert_refused(run(vmm_backend, "mbinfo", "--append", "a" * 4097), "4097 bytes")


def assert_refused(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("vmm: ") and fragment in lines[0], proc.stderr
    assert proc.stdout == ""


# --- QEMU as the oracle: the images pass there, and `vmm qemu` prints what QEMU prints -----


def qemu(machine: tuple[str, ...], name: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [QEMU or "qemu", "-accel", "tcg", *machine, *QEMU_COMMON, "-no-reboot", "-kernel", image(name), *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def mmap_entries(lines: list[str]) -> list[tuple[int, int, int]]:
    fields = [dict(f.split("=") for f in line.split()[1:]) for line in lines if line.startswith("mmap ")]
    return [(int(f["base"], 16), int(f["len"], 16), int(f["type"], 16)) for f in fields]


@needs_qemu
@pytest.mark.parametrize("machine", [QEMU_PC, QEMU_MICROVM], ids=["pc", "microvm"])
def test_qemu_gives_mbinfo_what_the_tests_expect_of_vmm(tmp_path, machine):
    mod = tmp_path / "mod.bin"
    mod.write_bytes(b"0123456789")
    proc = qemu(machine, "mbinfo", "-m", "64", "-append", "a b", "-initrd", f"{mod} arg")
    lines, expected_map = console(proc), pc_memory_map(64 * MiB)
    got = mmap_entries(lines)
    ram = [e for e in got if e[0] == MiB and e[2] == 1]
    assert len(ram) == 1 and set(expected_map[:3]) <= set(got)  # the BIOS areas as vmm reports them
    if machine == QEMU_PC:
        assert ram[0][1] < expected_map[3][1]  # SeaBIOS keeps the top of low RAM for its tables
    else:
        assert ram[0] == expected_map[3]
    expected = mbinfo_lines(64 * MiB, f"{image('mbinfo')} a b", [(b"0123456789", f"{mod} arg")], loader="qemu")
    expected[0] = f"mem_lower=639 mem_upper={ram[0][1] // 1024}"  # from 1 MiB to the first hole
    assert [line for line in lines if not line.startswith("mmap ")] == [e for e in expected if "mmap " not in e]
    assert proc.returncode == 1


ORACLE = [
    ("smp", ["-smp", "3"], smp_lines(3)),
    ("apic-timer", ["-append", "ticks=25"], None),
    ("exceptions", [], exceptions_lines(ALL_CASES)),
    ("realmode8000", [], ["hello from real mode at 0x8000", "PASS realmode8000"]),
]


@needs_qemu
@pytest.mark.parametrize(("name", "args", "expected"), ORACLE, ids=[o[0] for o in ORACLE])
def test_each_image_passes_on_qemu(name, args, expected):
    for machine in (QEMU_PC, QEMU_MICROVM):
        proc = qemu(machine, name, "-m", "64", *args)
        lines = console(proc)
        if expected is None:
            assert same_timer(lines) == ["timer: 25 periodic, 1 one-shot", "<tsc-deadline>", "PASS apic-timer"]
        else:
            assert lines == expected
        assert proc.returncode == 1


@needs_qemu
@pytest.mark.parametrize("name", IMAGES)
def test_vmm_qemu_prints_what_qemu_prints(vmm_backend, tmp_path, name):
    mod = tmp_path / "mod.bin"
    mod.write_bytes(b"module")
    args = {
        "mbinfo": ["-append", "x y", "-initrd", f"{mod} s,{mod}"],
        "smp": ["-smp", "3"],
        "apic-timer": ["-append", "ticks=5"],
        "exceptions": ["-append", "cases=" + ",".join(KVM_HERE_CASES if vmm_backend == "kvm" else ALL_CASES)],
        "realmode8000": [],
    }[name]
    accel = "kvm" if vmm_backend == "kvm" else "tcg"
    common = ["-M", "pc", "-m", "64", *QEMU_COMMON, "-no-reboot", "-kernel", image(name), *args]
    ours = vmm("qemu", "-accel", accel, *common)
    theirs = qemu(QEMU_PC, name, "-m", "64", *args)

    def comparable(lines: list[str]) -> list[str]:  # what depends on the firmware, not the VMM
        lines = same_timer(lines) if name == "apic-timer" else lines
        return [line for line in lines if not line.startswith(("mem_lower", "mmap ", "loader="))]

    assert comparable(console(ours)) == comparable(console(theirs))
    assert ours.returncode == theirs.returncode == 1
