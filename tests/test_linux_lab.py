"""A real Linux boot: the lab's own Debian kernel (the running release inside the lab) with
a busybox initramfs (lab/linuxguest.py) under ``vmm run --kernel --initrd``, with 1 and 2
vCPUs. Its /init writes the boot-marker port, prints a marker line with the CPU count and
writes that count to the exit port from userspace (/dev/port), so the run ends with status
``(cpus << 1) | 1``. `make lab-test` runs it on kernels 7 and 6.12 (lab/kernel-tests).

It needs a KVM that can run a stock kernel: not this project's PVM hosts (their ring-0
instruction emulator fails; tests/test_linux_boot.py asserts how), so there it skips."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmm_cli import ROOT, vmm

sys.path.insert(0, str(ROOT / "lab"))
import linuxguest  # lab/ is not a package: its modules import each other by name

BOOT_TIMEOUT = 240  # seconds for vmm; a boot takes 10-25 s in the lab (TCG), well under 1 s on hardware


def _missing(request: pytest.FixtureRequest, reason: str) -> None:
    """Skip, or fail under --vmm-require-kvm (inside the lab this test must run)."""
    if request.config.getoption("--vmm-require-kvm"):
        pytest.fail(f"--vmm-require-kvm: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    busybox = linuxguest.find_busybox()
    if busybox is None:
        pytest.skip("no unpacked busybox-static under .cache/lab/busybox (lab/build downloads it)")
    path = tmp_path_factory.mktemp("linux") / "init.cpio.gz"
    path.write_bytes(linuxguest.pack(busybox.read_bytes()))
    return path


@pytest.mark.kvm
@pytest.mark.lab
@pytest.mark.parametrize("vcpus", [1, 2])
def test_the_lab_kernel_boots_to_init_and_reports_its_cpus(request, initramfs, vcpus):
    if Path("/sys/module/kvm_pvm").is_dir():
        pytest.skip("this PVM host's KVM cannot run a stock kernel's ring-0 code (test_linux_boot.py asserts how)")
    kernel = linuxguest.find_kernel()
    if kernel is None:
        _missing(request, "no Debian kernel under .cache/lab/kernel (lab/build downloads them)")
    proc = vmm(
        "run", "--kernel", str(kernel), "--initrd", str(initramfs), "--mem", "256M", "--vcpus", str(vcpus),
        "--backend", "kvm", "--timeout", str(BOOT_TIMEOUT), "--json",
        timeout=BOOT_TIMEOUT + 60,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    result = json.loads(proc.stdout)
    tail = result["console"][-3000:]
    assert f"{linuxguest.MARKER} cpus={vcpus}\r\n" in result["console"], (result["reason"], tail)
    assert result["exit_value"] == vcpus and proc.returncode == (vcpus << 1) | 1, (result["reason"], tail)
    assert [m["value"] for m in result["marks"]][:1] == [linuxguest.INIT_MARK]
    assert 0 < result["first_mark_seconds"] <= result["seconds"]
    print(
        f"\n{kernel}: {vcpus} vCPU(s), status {proc.returncode}, "
        f"time to init {result['first_mark_seconds']:.2f} s, run {result['seconds']:.2f} s"
    )


def _read_until(proc: subprocess.Popen[bytes], needle: bytes, seen: bytearray, deadline: float) -> bool:
    """Read the live console (vmm's stdout) into ``seen`` until ``needle`` shows or the
    deadline passes or vmm ends."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while needle not in seen and time.monotonic() < deadline:
            if not sel.select(timeout=1.0):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return False
            seen += chunk
    return needle in seen


@pytest.mark.kvm
@pytest.mark.lab
def test_a_shell_on_the_console_runs_what_is_typed(request, tmp_path):
    """Typing reaches Linux: the initramfs gives ttyS0 to busybox sh; once it is up, the
    test types two lines into vmm's stdin (a pipe). The first is computed by the shell (its
    output differs from the tty's echo of the line), the second powers off through the exit
    port, so the status is the shell's too."""
    if Path("/sys/module/kvm_pvm").is_dir():
        pytest.skip("this PVM host's KVM cannot run a stock kernel's ring-0 code (test_linux_boot.py asserts how)")
    kernel, busybox = linuxguest.find_kernel(), linuxguest.find_busybox()
    if kernel is None or busybox is None:
        _missing(request, "no Debian kernel or busybox under .cache/lab (lab/build downloads them)")
    initrd = tmp_path / "shell.cpio.gz"
    initrd.write_bytes(linuxguest.pack(busybox.read_bytes(), linuxguest.SHELL_INIT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmm", "run", "--kernel", str(kernel), "--initrd", str(initrd), "--mem", "256M",
         "--backend", "kvm", "--timeout", str(BOOT_TIMEOUT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    seen = bytearray()
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        assert _read_until(proc, linuxguest.SHELL_READY.encode() + b"\r\n", seen, deadline), seen[-3000:]
        time.sleep(1.0)  # the shell opens the tty after the line: bytes before that would be flushed
        assert proc.stdin is not None
        proc.stdin.write(b"echo typed-$((6*7))\n")
        proc.stdin.write(b"printf '\\003' | dd of=/dev/port bs=1 seek=244 conv=notrunc\n")
        proc.stdin.flush()
        found = _read_until(proc, b"typed-42", seen, deadline)
        rest, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    seen += rest
    assert found, seen[-3000:]
    assert proc.returncode == (3 << 1) | 1, (proc.returncode, err.decode(errors="replace"), seen[-2000:])
