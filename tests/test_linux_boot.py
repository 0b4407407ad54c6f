"""`vmm run --kernel` through the Linux boot protocol, end to end on both backends: a
synthetic bzImage whose 64-bit entry (load address + 0x200) is a tiny program that reads the
zero page RSI points at — it prints the command line at cmd_line_ptr and exits with the
initrd's size in pages — and, where a Debian kernel is cached, what a stock kernel does on
this host (its ring-0 code cannot run in PVM's instruction emulator: one line, status 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_linux_loader import bzimage
from vmm_cli import ROOT, vmm

# 64-bit, at load + 0x200, RSI = the zero page:
#   mov rbx, rsi; mov esi, [rbx+0x228] (cmd_line_ptr); mov dx, 0x3f8
#   1: lodsb; test al, al; jz 2f; out dx, al; jmp 1b
#   2: mov al, 10; out dx, al; mov eax, [rbx+0x21c] (ramdisk_size); shr eax, 12; out 0xf4, al
#   3: hlt; jmp 3b
ENTRY64 = bytes.fromhex(
    "4889f3" "8bb328020000" "66baf803" "ac" "84c0" "7403" "ee" "ebf8" "b00a" "ee" "8b831c020000" "c1e80c" "e6f4"
    "f4" "ebfd"
)  # fmt: skip
LINUX_DEFAULTS = "console=ttyS0 reboot=k panic=-1"


@pytest.fixture
def kernel(tmp_path: Path) -> str:
    payload = bytes(0x200) + ENTRY64 + bytes(0x1000)
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(payload=payload))
    return str(path)


def run(*args: str) -> tuple[int, dict]:
    proc = vmm("run", *args, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_the_kernel_finds_its_command_line_and_initrd_in_the_zero_page(kernel, tmp_path, vmm_backend):
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(b"\x07" * (5 * 4096))
    status, result = run(
        "--kernel", kernel, "--initrd", str(initrd), "--append", "quiet init=/x", "--backend", vmm_backend
    )
    assert result["console"] == f"{LINUX_DEFAULTS} quiet init=/x\n", result["reason"]
    assert result["exit_value"] == 5 and status == 11
    assert result["mode"] == "long"


def test_without_an_initrd_the_ramdisk_is_empty(kernel, vmm_backend):
    status, result = run(kernel, "--backend", vmm_backend)
    assert result["console"] == LINUX_DEFAULTS + "\n" and result["exit_value"] == 0 and status == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["guests/hello64.elf", "--kernel", "guests/hello64.elf"], "give the image once"),
        ([], "give the image once"),
        (["guests/hello64.elf", "--initrd", "guests/hello16.bin"], "--initrd is for Linux kernels"),
        (["KERNEL", "--initrd", "/nonexistent/initrd"], "/nonexistent/initrd: no such file"),
        (["KERNEL", "--mem", "16M"], "give more --mem"),
        (["KERNEL", "--append", "x" * 3000], "command line"),
    ],
)
def test_bad_linux_input_is_one_line_and_status_2(kernel, args, fragment):
    proc = vmm("run", *[kernel if a == "KERNEL" else a for a in args])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmm: ") and fragment in lines[0], proc.stderr


def _cached_kernel() -> Path | None:
    patterns = (
        ".cache/linux/vmlinuz*",
        ".cache/lab/kernel/*/boot/vmlinuz-*",
        ".cache/lab/kernel/*/usr/lib/*/*/vmlinuz",
    )
    for pattern in patterns:
        found = sorted(ROOT.glob(pattern))
        if found:
            return found[0]
    return None


def _pvm_host() -> bool:
    return Path("/sys/module/kvm_pvm").is_dir()


@pytest.mark.kvm
def test_a_stock_kernel_on_this_pvm_host_ends_with_one_line_not_a_hang():
    image = _cached_kernel()
    if image is None:
        pytest.skip("no Debian kernel cached (.cache/linux/vmlinuz* or the lab's, from make lab-test)")
    if not _pvm_host():
        pytest.skip("only a PVM host (kvm_pvm) is known to fail a stock kernel's ring-0 code")
    proc = vmm("run", "--kernel", str(image), "--mem", "256M", "--backend", "kvm", "--timeout", "60")
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "guest crashed" in proc.stderr and "instruction emulation failed" in proc.stderr
