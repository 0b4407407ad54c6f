"""The `vmm` command as a user meets it: subprocesses, exit statuses, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from vmm_cli import vmm

ROOT = Path(__file__).resolve().parent.parent


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str, status: int = 2) -> None:
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmm: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def _elf_with(tmp_path: Path, patch) -> str:
    data = bytearray((ROOT / "guests/hello64.elf").read_bytes())
    patch(data)
    path = tmp_path / "patched.elf"
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "guests/nope.elf"], "no such file"),
        (["run", "guests"], "is a directory"),
        (["run", "guests/hello64.elf", "--mem", "0"], "--mem must be more than 0"),
        (["run", "guests/hello64.elf", "--mem", "1T"], "more than"),
        (["run", "guests/hello64.elf", "--mem", "lots"], "bad size 'lots'"),
        (["run", "guests/hello64.elf", "--mem", "100K"], "too small"),
        (["run", "guests/hello64.elf", "--vcpus", "0"], "--vcpus must be between 1 and 64"),
        (["run", "guests/hello64.elf", "--vcpus", "65"], "--vcpus must be between 1 and 64"),
        (["run", "guests/hello64.elf", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["run", "guests/hello64.elf", "--mode", "warp"], "unknown mode 'warp'"),
        (["run", "guests/hello64.elf", "--arg", "novalue"], "is not KEY=VALUE"),
        (["run", "guests/hello64.elf", "--timeout", "-1"], "bad timeout"),
        (["run", "guests/hello64.elf", "--load-addr", "0x200000"], "--load-addr is for flat binaries"),
        (["run", "guests/hello16.bin", "--load-addr", "zz"], "bad load address 'zz'"),
        (["run", "guests/hello16.bin", "--mode", "long", "--load-addr", "0x3000"], "overlaps the VMM's boot"),
        (["frob"], "invalid choice: 'frob'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_input_gets_one_line_and_status_2(args, fragment):
    assert_one_line_error(vmm(*args), fragment)


def test_empty_truncated_and_foreign_images(tmp_path):
    empty = tmp_path / "empty.elf"
    empty.write_bytes(b"")
    assert_one_line_error(vmm("run", str(empty)), "empty image")
    truncated = tmp_path / "truncated.elf"
    truncated.write_bytes((ROOT / "guests/hello64.elf").read_bytes()[:40])
    assert_one_line_error(vmm("run", str(truncated)), "malformed or truncated ELF")
    arm = _elf_with(tmp_path, lambda d: d.__setitem__(slice(18, 20), (183).to_bytes(2, "little")))
    assert_one_line_error(vmm("run", arm), "not x86")


def test_image_outside_ram_and_larger_than_ram(tmp_path):
    def move_segment(d: bytearray) -> None:
        phoff = int.from_bytes(d[32:40], "little")
        # p_vaddr and p_paddr of the first program header -> 1 GiB, beyond 64 MiB of RAM
        d[phoff + 16 : phoff + 24] = (1 << 30).to_bytes(8, "little")
        d[phoff + 24 : phoff + 32] = (1 << 30).to_bytes(8, "little")

    assert_one_line_error(vmm("run", _elf_with(tmp_path, move_segment)), "do not fit in guest RAM")
    big = tmp_path / "big.bin"
    big.write_bytes(b"\xf4" * (3 << 20))
    assert_one_line_error(vmm("run", str(big), "--mem", "2M", "--mode", "long"), "do not fit in guest RAM")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file without read permission")
def test_unreadable_image(tmp_path):
    path = tmp_path / "secret.elf"
    path.write_bytes((ROOT / "guests/hello64.elf").read_bytes())
    path.chmod(0)
    assert_one_line_error(vmm("run", str(path)), "permission denied")


def test_missing_kvm_device_with_the_kvm_backend():
    proc = vmm("run", "guests/hello64.elf", "--backend", "kvm", env={"VMM_KVM_DEVICE": "/nonexistent/kvm"})
    assert_one_line_error(proc, "/nonexistent/kvm: no such device")


def test_a_file_that_is_not_kvm(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    proc = vmm("run", "guests/hello64.elf", "--backend", "kvm", env={"VMM_KVM_DEVICE": str(fake)})
    assert_one_line_error(proc, "not a KVM device")


@pytest.mark.kvm
def test_run_prints_the_console_and_a_summary():
    proc = vmm("run", "guests/hello64.elf", "--backend", "kvm")
    assert proc.returncode == 1
    assert proc.stdout == "hello from long mode\n"
    (line,) = proc.stderr.splitlines()
    assert line.startswith("vmm: guest exited with value 0 (status 1)")
    quiet = vmm("run", "guests/hello64.elf", "-q", "--backend", "kvm")
    assert quiet.stderr == "" and quiet.returncode == 1


@pytest.mark.kvm
def test_run_json_has_the_documented_keys():
    proc = vmm("run", "guests/memtouch64.elf", "--json", "--arg", "passes=2", "--mem", "16M", "--backend", "kvm")
    result = json.loads(proc.stdout)
    assert {"status", "reason", "console", "vcpus", "exits", "seconds"} <= set(result)
    assert result["status"] == proc.returncode == 1
    assert result["console"].startswith("memtouch: ")
    assert result["vcpus"] == 1 and result["exits"][0]["io"] > 0
    assert [m["value"] for m in result["marks"]] == [0x1000, 0x2000, 0x1001, 0x2001]
    assert proc.stderr == ""


def test_the_first_mark_is_reported_in_seconds_since_the_run_started(vmm_backend):
    marked = vmm("run", "guests/memtouch64.elf", "--arg", "passes=1", "--mem", "16M", "--backend", vmm_backend)
    assert marked.returncode == 1 and "; first mark after " in marked.stderr, marked.stderr
    result = json.loads(vmm("run", "guests/memtouch64.elf", "--json", "--mem", "16M", "--backend", vmm_backend).stdout)
    assert 0 <= result["first_mark_seconds"] <= result["seconds"]
    unmarked = json.loads(vmm("run", "guests/hello64.elf", "--json", "--backend", vmm_backend).stdout)
    assert unmarked["marks"] == [] and unmarked["first_mark_seconds"] is None


@pytest.mark.kvm
def test_exit_value_becomes_an_odd_status(tmp_path):
    # mov al, 21 ; out 0xf4, al   (real mode flat)
    image = tmp_path / "exit21.bin"
    image.write_bytes(bytes.fromhex("b015e6f4f4"))
    assert vmm("run", str(image), "-q").returncode == (21 << 1) | 1


@pytest.mark.kvm
def test_all_halted_is_status_0(tmp_path):
    image = tmp_path / "hlt.bin"
    image.write_bytes(bytes.fromhex("f4"))
    proc = vmm("run", str(image))
    assert proc.returncode == 0
    assert "all vCPUs halted" in proc.stderr


@pytest.mark.kvm
def test_spin_is_stopped_by_the_timeout():
    proc = vmm("run", "guests/spin64.elf", "--timeout", "1", "--json", "--vcpus", "2", "--backend", "kvm")
    result = json.loads(proc.stdout)
    assert proc.returncode == 124 == result["status"]
    assert result["reason"] == "timeout after 1 s"
    assert result["exit_value"] is None and "crash" not in result
    # spin64 never exits by itself: each vCPU left KVM_RUN only because it was kicked.
    assert [e["interrupted"] >= 1 for e in result["exits"]] == [True, True], result["exits"]


@pytest.mark.kvm
def test_triple_fault_names_the_vcpu_and_rip():
    proc = vmm("run", "guests/triple-fault.bin")
    assert proc.returncode == 4
    assert proc.stdout == "triple fault next\n"
    (line,) = proc.stderr.splitlines()
    assert "vCPU 0" in line and "triple fault" in line and "rip 0x" in line
    verbose = vmm("run", "guests/triple-fault.bin", "-v")
    assert "registers: rax=" in verbose.stderr


def test_the_image_is_never_modified(tmp_path):
    image = tmp_path / "hello.elf"
    data = (ROOT / "guests/hello64.elf").read_bytes()
    image.write_bytes(data)
    before = image.stat()
    vmm("run", str(image), "-q")
    assert image.read_bytes() == data
    assert image.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.kvm
def test_caps_reports_capabilities_by_name():
    text = vmm("caps")
    assert text.returncode == 0
    assert "PRE_FAULT_MEMORY" in text.stdout and "pre-fault:" in text.stdout
    report = json.loads(vmm("caps", "--json").stdout)
    assert report["api_version"] == 12
    assert report["kvm_usable"] is True and report["backend"] == "kvm"
    assert report["capabilities"]["USER_MEMORY"] == 1
    assert isinstance(report["capabilities"]["PRE_FAULT_MEMORY"], int)


def test_caps_without_kvm_names_the_reason_and_the_fallback():
    report = json.loads(vmm("caps", "--json", env={"VMM_KVM_DEVICE": "/nonexistent/kvm"}).stdout)
    assert report["kvm_usable"] is False and report["backend"] == "emulator"
    assert "no such device" in report["reason"]


def test_help_lists_the_exit_statuses():
    proc = vmm("run", "--help")
    assert proc.returncode == 0
    assert "(v << 1) | 1" in proc.stdout and "124" in proc.stdout


def test_serial_file_is_created_or_truncated_and_gets_the_console(tmp_path, vmm_backend):
    out = tmp_path / "console.log"
    out.write_text("old contents that must go\n" * 10)
    proc = vmm("run", "guests/hello64.elf", "--serial", str(out), "--backend", vmm_backend)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert out.read_text() == "hello from long mode\n"
    none = vmm("run", "guests/hello64.elf", "--serial", "none", "--backend", vmm_backend)
    assert none.returncode == 1 and none.stdout == ""


@pytest.mark.parametrize(("target", "fragment"), [(".", "is a directory"), ("/nonexistent/dir/f", "No such file")])
def test_serial_refuses_what_it_cannot_write_in_one_line(target, fragment):
    proc = vmm("run", "guests/hello64.elf", "--serial", target)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr
