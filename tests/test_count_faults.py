"""`vmm run --count-faults`: the page faults KVM took for each vCPU of this run, in the
summary and in --json (vmm.faults does the counting; these tests drive the whole path)."""

from __future__ import annotations

import json

import pytest
from vmm_cli import vmm

from vmm.faults import fault_counting_available


def faults_of(*args: str) -> tuple[dict, list[dict[str, int]]]:
    proc = vmm("run", "guests/memtouch64.elf", "--backend", "kvm", "--count-faults", "--json", *args)
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    return result, result["faults"]


@pytest.fixture
def counting() -> None:
    ok, why = fault_counting_available()
    if not ok:
        pytest.skip(f"KVM fault counting is not available here: {why}")


@pytest.mark.kvm
def test_a_first_touch_of_fresh_4k_pages_takes_a_fault_per_page(counting):
    result, faults = faults_of("--mem", "32M", "--memory", "anon")
    pages = int(result["console"].split()[1])  # "memtouch: <pages> pages x 1 passes, ..."
    assert len(faults) == 1
    assert faults[0]["faults"] >= pages


@pytest.mark.kvm
def test_huge_pages_take_far_fewer_faults_and_each_vcpu_is_counted_alone(counting):
    _, anon = faults_of("--mem", "32M", "--memory", "anon")
    _, thp = faults_of("--mem", "32M", "--memory", "thp")
    assert thp[0]["faults"] * 10 < anon[0]["faults"]


@pytest.mark.kvm
def test_summary_names_the_counts(counting):
    proc = vmm("run", "guests/hello64.elf", "--backend", "kvm", "--count-faults")
    assert proc.returncode == 1
    assert "KVM page faults per vCPU: " in proc.stderr


def test_the_emulator_has_no_kvm_faults_to_count():
    proc = vmm("run", "guests/hello64.elf", "--backend", "emulator", "--count-faults")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vmm: --count-faults counts KVM's page faults; the emulator backend takes none"
