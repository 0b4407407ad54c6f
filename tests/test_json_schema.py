"""Every ``--json`` output of ``vmm run``, ``vmm caps`` and ``vmm prefault`` (and every error
under ``--json``) validates against the JSON Schema published in the package (vmm/schema)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from vmm_cli import ROOT, vmm

from vmm import schema
from vmm.caps import USED_CAPS

NO_KVM = {"VMM_KVM_DEVICE": "/nonexistent/kvm"}


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema.load(name))


def assert_valid(name: str, obj: Any) -> None:
    errors = sorted(validator(name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, f"{name}.json: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def one_json_object(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The command's stdout: exactly one JSON object on one line."""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def objects(node: Any) -> list[dict[str, Any]]:
    """Every sub-schema of ``node`` that describes an object with named properties."""
    found = []
    if isinstance(node, dict):
        if "properties" in node:
            found.append(node)
        for value in node.values():
            found += objects(value)
    elif isinstance(node, list):
        for value in node:
            found += objects(value)
    return found


def property_names(node: Any) -> set[str]:
    return {key for obj in objects(node) for key in obj["properties"]}


@pytest.mark.parametrize("name", schema.NAMES)
def test_each_schema_is_draft_2020_12_with_documented_keys_only(name):
    doc = schema.load(name)
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["properties"]["schema_version"]["const"] == schema.SCHEMA_VERSION
    assert "schema_version" in doc["required"]
    for obj in objects(doc):
        assert obj.get("additionalProperties") is False, f"{name}.json: an object that allows undocumented keys"
    for key in property_names(doc):
        assert re.fullmatch(r"[a-z][a-z0-9_]*|[A-Z][A-Z0-9_]*", key), f"{name}.json: {key!r}"
    assert schema.path(name).endswith(f"{name}.json") and Path(schema.path(name)).is_file()


def test_caps_schema_names_exactly_the_capabilities_reported():
    listed = schema.load("caps")["properties"]["capabilities"]["properties"]
    assert list(listed) == [cap.name for cap in USED_CAPS]


def test_every_key_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## JSON output")
    section = readme[start : readme.index("\n## ", start + 1)]
    keys = {key for name in schema.NAMES for key in property_names(schema.load(name))}
    missing = sorted(key for key in keys if f"`{key}`" not in section)
    assert not missing, f"keys the README's JSON section does not document: {missing}"


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["guests/hello64.elf"], {"status": 1, "exit_value": 0, "console": "hello from long mode\n"}),
        (["guests/memtouch64.elf", "--mem", "16M", "--arg", "passes=2", "--prefault", "auto"], {"status": 1}),
        (["guests/spin64.elf", "--timeout", "1", "--vcpus", "2"], {"status": 124, "exit_value": None}),
        (["guests/triple-fault.bin"], {"status": 4, "exit_value": None}),
    ],
    ids=["exit", "prefault", "timeout", "crash"],
)
def test_run_json_validates(args, expect):
    proc = vmm("run", *args, "--json")
    result = one_json_object(proc)
    assert_valid("run", result)
    assert result["status"] == proc.returncode
    assert {k: result[k] for k in expect} == expect
    assert ("crash" in result) == (expect["status"] == 4)
    assert ("prefault" in result) == ("--prefault" in args)
    if "prefault" in result:
        assert result["prefault"]["strategy_requested"] == "auto"
        assert result["prefault"]["bytes_requested"] == result["prefault"]["bytes_done"] == 16 << 20


def test_run_json_with_count_faults_validates_either_way():
    # Where this host can count KVM's faults the run carries `faults`; where it cannot (no
    # KVM, no tracefs), the refusal is the error object: both are in the published schema.
    proc = vmm("run", "guests/memtouch64.elf", "--mem", "16M", "--arg", "passes=2", "--count-faults", "--json")
    result = one_json_object(proc)
    assert result["status"] == proc.returncode
    if "error" in result:
        assert_valid("error", result)
        assert proc.returncode == 2
    else:
        assert_valid("run", result)
        assert result["backend"] == "kvm" and len(result["faults"]) == 1


@pytest.mark.parametrize("env", [{}, NO_KVM], ids=["host", "no-kvm"])
def test_caps_json_validates(env):
    proc = vmm("caps", "--json", env=env)
    report = one_json_object(proc)
    assert_valid("caps", report)
    assert proc.returncode == 0
    assert (report["reason"] is None) == report["kvm_usable"] == (report["backend"] == "kvm")
    if not report["kvm_usable"]:
        assert report["capabilities"] == {} and report["api_version"] is None


def test_prefault_json_validates():
    proc = vmm("prefault", "--mem", "16M", "--strategy", "none,host", "--json")
    report = one_json_object(proc)
    assert_valid("prefault", report)
    assert proc.returncode == 0
    assert report["mem_bytes"] == 16 << 20 and report["repeat"] == 1
    assert [r["strategy_requested"] for r in report["rows"]] == ["none", "host"]
    assert [r["strategy_used"] for r in report["rows"]] == ["none", "host"]


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["run", "guests/hello64.elf", "--json", "--frobnicate"], {}, "unrecognized arguments: --frobnicate"),
        (["run", "--json"], {}, "give the image once"),
        (["run", "guests/nope.elf", "--json"], {}, "no such file"),
        (["run", "guests", "--json"], {}, "is a directory"),
        (["run", "guests/hello64.elf", "--json", "--mem", "lots"], {}, "bad size 'lots'"),
        (["run", "guests/hello64.elf", "--json", "--timeout", "nan"], {}, "bad timeout"),
        (["run", "guests/hello64.elf", "--j", "--vcpus", "0"], {}, "--vcpus must be between 1 and 64"),
        (["run", "guests/hello64.elf", "--json", "--backend", "kvm"], NO_KVM, "no such device"),
        (["run", "guests/hello64.elf", "--json", "--mode", "warp"], {}, "unknown mode 'warp'"),
        (["caps", "--json", "--frobnicate"], {}, "unrecognized arguments"),
        (["prefault", "--json", "--mem", "16M", "--strategy", "warp"], {}, "warp"),
        (["prefault", "--json", "--repeat", "0"], {}, "--repeat must be at least 1"),
        (["prefault", "--json", "--repeat", "x"], {}, "invalid int value"),
        (["prefault", "--json", "--mem", "16M", "--image", "guests/nope.elf"], {}, "no such file"),
        (["prefault", "--json", "--mem", "16M", "--strategy", "none", "--backend", "kvm"], NO_KVM, "no such device"),
        (["--json"], {}, "required: COMMAND"),
    ],
)
def test_errors_under_json_are_the_error_object(args, env, fragment):
    proc = vmm(*args, env=env)
    error = one_json_object(proc)
    assert_valid("error", error)
    assert error["status"] == proc.returncode == 2
    assert fragment in error["error"]
    (line,) = proc.stderr.splitlines()  # the same one line for a person, on stderr
    assert line == f"vmm: {error['error']}"


def test_run_json_never_reads_the_schema_files():
    # The schemas are for consumers and tests: `vmm run` must not pay for them at start-up.
    code = f"""
import sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
from vmm.cli import main
status = main(["run", {str(ROOT / "guests/hello64.elf")!r}, "--json"])
assert status == 1, status
sys.stderr.write(repr([p for p in opened if "schema" in p and p.endswith(".json")]))
sys.stderr.write("|" + repr("jsonschema" in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.rsplit("\n", 1)[-1] == "[]|False"


def test_schema_command_prints_the_published_files():
    listing = vmm("schema")
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()] == list(schema.NAMES)
    for name in schema.NAMES:
        printed = vmm("schema", name)
        assert printed.returncode == 0
        assert json.loads(printed.stdout) == schema.load(name)
