"""What QEMU and Firecracker users reach for: ``-m``/``-smp``, ``--config FILE`` (JSON or
TOML, flags override it) and ``--log-level``."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
from vmm_cli import ROOT, vmm

from vmm.cli import build_parser, main
from vmm.cli.run import config_from
from vmm.config import MachineConfig
from vmm.cpu.layout import CpuMode
from vmm.errors import InputError
from vmm.memory import Backing

MBINFO = str(ROOT / "guests/pc/mbinfo.elf")  # prints the Multiboot memory fields it was given
HELLO = str(ROOT / "guests/hello64.elf")


def config(*argv: str) -> MachineConfig:
    """What `vmm run ARGV` would build, without building it."""
    return config_from(build_parser().parse_args(["run", *argv]))


def one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("vmm: ") and fragment in line, line
    assert proc.stdout == ""


# --- -m and -smp --------------------------------------------------------------------------
def test_qemu_spellings_of_mem_and_vcpus_are_aliases():
    assert config(HELLO, "-m", "32M", "-smp", "3") == config(HELLO, "--mem", "32M", "--vcpus", "3")
    assert config(HELLO, "-m", "32").mem == 32 << 20  # a bare number is MiB, as QEMU's -m


def test_the_guest_sees_the_memory_and_vcpus_given_as_m_and_smp():
    proc = vmm("run", MBINFO, "-m", "32M", "-smp", "2", "--json")
    result = json.loads(proc.stdout)
    assert result["vcpus"] == 2 and proc.returncode == result["status"]
    assert "mem_upper=31744" in result["console"]  # 32 MiB - the first MiB, in KiB


def test_prefault_takes_m():
    proc = vmm("prefault", "-m", "16M", "--strategy", "none", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mem_bytes"] == 16 << 20


# --- --config FILE --------------------------------------------------------------------------
def test_a_toml_file_sets_every_field(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_text(
        f"""
image = {HELLO!r}
mem = "32M"
vcpus = 2
mode = "long"
timeout = 5.5
strict = true
backend = "emulator"
memory = "anon"
prefault = "host"
prefault_threads = 2
irqchip = false
append = "quiet"
modules = ["{MBINFO}=the module"]
fw_cfg = ["name=opt/x,string=y"]
count_faults = false

[args]
case = "7"
"""
    )
    got = config("--config", str(cfg))
    assert got == MachineConfig.parse(
        HELLO,
        mem="32M",
        vcpus=2,
        mode="long",
        timeout=5.5,
        strict=True,
        backend="emulator",
        memory="anon",
        prefault="host",
        prefault_threads=2,
        irqchip=False,
        append="quiet",
        modules=[(MBINFO, "the module")],
        fw_cfg=["name=opt/x,string=y"],
        count_faults=False,
        args={"case": "7"},
    )
    assert got.mode is CpuMode.LONG and got.memory is Backing.ANON


def test_flags_override_the_file_and_args_merge_key_by_key(tmp_path):
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"image": MBINFO, "mem": "32M", "vcpus": 2, "args": {"a": "1", "b": "2"}}))
    got = config("--config", str(cfg), "-m", "16M", "--arg", "b=3", HELLO)
    assert (got.image, got.mem, got.vcpus) == (HELLO, 16 << 20, 2)
    assert dict(got.args) == {"a": "1", "b": "3"}
    assert config("--config", str(cfg)).timeout == 60.0  # MachineConfig's default where neither sets it


def test_json_nulls_mean_not_set(tmp_path):
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"image": HELLO, "mode": None, "timeout": None, "prefault": None}))
    got = config("--config", str(cfg))
    assert (got.mode, got.timeout, got.prefault) == (None, None, None)


def test_the_machine_runs_from_a_config_file(tmp_path):
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"image": MBINFO, "mem": "32M", "vcpus": 2}))
    result = json.loads(vmm("run", "--config", str(cfg), "--json").stdout)
    assert result["vcpus"] == 2 and "mem_upper=31744" in result["console"]
    override = json.loads(vmm("run", "--config", str(cfg), "-m", "16M", "--json").stdout)
    assert "mem_upper=15360" in override["console"]


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("vm.json", '{"image": "x", "memory_size": 64}', "unknown key 'memory_size'"),
        ("vm.toml", 'image = "x"\nmem = true', "mem must be a number or a string, not a boolean"),
        ("vm.json", '{"image": "x", "vcpus": [1]}', "vcpus must be a number or a string, not a list"),
        ("vm.json", '{"image": "x", "strict": "yes"}', "strict must be a boolean, not a string"),
        ("vm.json", '{"image": "x", "args": {"k": 1}}', "args.k must be a string, not a number"),
        ("vm.json", '{"image": "x", "modules": [1]}', "modules must be a list of strings"),
        ("vm.json", '{"image": null}', "image must be a string, not null"),
        ("vm.json", '["image"]', "the top level must be an object"),
        ("vm.json", '{"image": "x",}', "bad JSON: "),
        ("vm.toml", "image = ", "bad TOML: "),
        ("vm.toml", "mem = '32M'", "give the image once"),
        ("vm.conf", '{"image": "x"', "bad JSON"),  # no suffix: sniffed as JSON
    ],
)
def test_bad_config_files_are_one_line(tmp_path, name, text, fragment):
    cfg = tmp_path / name
    cfg.write_text(text)
    with pytest.raises(InputError) as info:
        config("--config", str(cfg))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_non_utf8_file_is_refused(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_bytes(b'image = "\xff"')
    with pytest.raises(InputError, match="not UTF-8 text"):
        config("--config", str(cfg))


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("fifo", "is a FIFO, not a config file"),
        ("device", "is a character device, not a config file"),
    ],
)
def test_config_paths_that_are_not_files_are_one_line_and_status_2(tmp_path, kind, fragment):
    path = {"missing": tmp_path / "nope.json", "directory": tmp_path, "device": Path("/dev/zero")}.get(kind)
    if kind == "fifo":
        path = tmp_path / "fifo.json"
        os.mkfifo(path)  # nobody writes it: opening it for reading must not wait
    for args in (["run", "--config", str(path)], ["run", "--config", str(path), "--json"]):
        proc = vmm(*args, timeout=60)
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"vmm: --config {path}: {fragment}"), line
        if "--json" in args:
            assert json.loads(proc.stdout) == {"schema_version": 1, "error": line[5:], "status": 2}
        else:
            assert proc.stdout == ""


def test_an_unreadable_config_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop a read")
    cfg = tmp_path / "vm.json"
    cfg.write_text("{}")
    cfg.chmod(0)
    one_line_error(vmm("run", "--config", str(cfg)), "cannot open: Permission denied")


# --- --log-level ----------------------------------------------------------------------------
def logged(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the one notice a host without KVM adds (the fallback to the emulator)."""
    return [line for line in proc.stderr.splitlines() if not line.endswith("running on the in-process emulator")]


def test_default_logging_is_quiet_and_info_says_what_the_vmm_decided():
    quiet = vmm("run", HELLO, "-q")
    assert quiet.returncode == 1 and logged(quiet) == []
    info = vmm("run", HELLO, "-q", "--log-level", "info")
    assert info.returncode == 1
    lines = info.stderr.splitlines()
    assert any(line.startswith("vmm: vmm.machine: backend ") and "(asked: auto)" in line for line in lines), lines
    assert any("exits per vCPU: io=" in line for line in lines), lines
    assert not any("guest RAM" in line for line in lines)  # a debug detail
    debug = vmm("run", HELLO, "-q", "--log-level", "debug")
    assert "vmm: vmm.machine: guest RAM 64 MiB" in debug.stderr
    assert "image " in debug.stderr and "elf64, long mode, entry 0x" in debug.stderr
    error = vmm("run", HELLO, "-q", "--log-level", "error")
    assert error.returncode == 1 and logged(error) == []


def test_log_level_is_checked_and_offered_by_every_subcommand():
    one_line_error(vmm("run", HELLO, "--log-level", "loud"), "argument --log-level: invalid choice: 'loud'")
    assert vmm("caps", "--log-level", "debug").returncode == 0
    assert vmm("prefault", "-m", "16M", "--strategy", "none", "--log-level", "info", "--json").returncode == 0


@pytest.fixture
def vmm_logger():
    """The vmm logger, put back as it was after the test (main() configures it)."""
    logger = logging.getLogger("vmm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_only_the_vmm_logger_is_configured(capsys, vmm_logger):
    root_before = list(logging.getLogger().handlers)
    added = len(vmm_logger.handlers) + 1
    for _ in range(2):  # once per process however often main() runs
        assert main(["caps", "--log-level", "info"]) == 0
    assert logging.getLogger().handlers == root_before
    assert len(vmm_logger.handlers) == added and vmm_logger.level == logging.INFO
    assert "device" in capsys.readouterr().out


def test_the_readme_config_example_runs(tmp_path):
    (block,) = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    cfg = tmp_path / "vm.toml"
    cfg.write_text(block)
    proc = vmm("run", "--config", str(cfg), "--json")  # from the repository root, as the README's paths are
    result = json.loads(proc.stdout)
    assert (result["status"], result["vcpus"]) == (1, 2)
    assert sorted(result["console"].splitlines()) == ["cpu 0 of 2", "cpu 1 of 2"]  # each vCPU once, any order
    assert result["prefault"]["strategy_requested"] == "auto" and result["prefault"]["bytes_done"] == 256 << 20
