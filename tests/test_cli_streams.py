"""The host's streams never decide the guest's status (issue 9, defect 6): a pipe closed
by its reader is the shell's 141, quietly; a full disk or a closed stream is one line on
stderr (when there is a stderr) and the guest's own status."""

from __future__ import annotations

import subprocess
import sys

from vmm_cli import ROOT

# Real mode, flat at 0x7c00: mov dx, 0x3f8; l: mov al, 'x'; out dx, al; jmp l
CHATTY = bytes.fromhex("baf803b078eeebfb")


def sh(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``command`` in bash from the repo root, with ``vmm`` meaning this interpreter's."""
    script = f'vmm() {{ "{sys.executable}" -m vmm "$@"; }}\n{command}'
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_a_closed_pipe_ends_the_run_quietly_with_141(tmp_path, vmm_backend):
    image = tmp_path / "chatty.bin"
    image.write_bytes(CHATTY)
    run = f"vmm run {image} --backend {vmm_backend} --timeout 30"
    proc = sh(f"{run} | head -c 100 >/dev/null; echo status=${{PIPESTATUS[0]}}")
    assert "status=141" in proc.stdout, (proc.stdout, proc.stderr)
    assert proc.stderr == ""


def test_a_full_disk_keeps_the_guests_status_and_says_so(guest, vmm_backend):
    proc = sh(f"vmm run {guest('hello64.elf')} --backend {vmm_backend} >/dev/full; echo status=$?")
    assert "status=1" in proc.stdout, proc.stderr
    assert "No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_to_a_full_disk_is_one_line_not_a_traceback(guest, vmm_backend):
    proc = sh(f"vmm run {guest('hello64.elf')} --backend {vmm_backend} --json >/dev/full; echo status=$?")
    assert "status=1" in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("vmm: ")


def test_a_closed_stdout_keeps_the_guests_status(guest, vmm_backend):
    proc = sh(f"vmm run {guest('hello64.elf')} --backend {vmm_backend} >&-; echo status=$? >&2")
    assert "status=1" in proc.stderr, proc.stderr
    assert "stdout is closed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_closed_stderr_keeps_the_console_and_the_status(guest, vmm_backend):
    proc = sh(f"vmm run {guest('hello64.elf')} --backend {vmm_backend} 2>&-; echo status=$?")
    assert proc.stdout == "hello from long mode\nstatus=1\n"
