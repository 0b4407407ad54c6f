"""The Intel MP table (MP specification 1.4): decoded back with struct here, checked against
what Linux's arch/x86/kernel/mpparse.c looks for (where it scans, the checksums, the entries)."""

from __future__ import annotations

import struct

import pytest

from vmm.cpu.layout import BootLayout
from vmm.errors import ConfigError
from vmm.platform.memmap import E820_RESERVED, pc_ram_map
from vmm.platform.mptable import MAX_MP_VCPUS, MP_TABLE_ADDR, mp_table, mp_table_size

SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}  # processor, bus, IOAPIC, interrupt, local interrupt
LINUX_SCAN = ((0x0, 0x400), (639 * 0x400, 0x400), (0xF0000, 0x10000))  # mpparse_find_mptable


def linux_scan(memory: bytes) -> int | None:
    """smp_scan_config over Linux's three ranges: the first 16-byte aligned "_MP_" with
    length 1, spec 1 or 4 and a zero checksum, or None."""
    for base, length in LINUX_SCAN:
        for addr in range(base, base + length, 16):
            mpf = memory[addr : addr + 16]
            if mpf[:4] == b"_MP_" and mpf[8] == 1 and mpf[9] in (1, 4) and sum(mpf) % 256 == 0:
                return addr
    return None


def decode(address: int, blob: bytes) -> tuple[dict, dict, list[tuple]]:
    """(floating pointer, table header, [(type, fields...)]) of a table at ``address``."""
    sig, physptr, length, spec, _checksum, f1, f2, f3, f4, f5 = struct.unpack_from("<4sIBBBBBBBB", blob, 0)
    mpf = {"sig": sig, "physptr": physptr, "length": length, "spec": spec, "features": (f1, f2, f3, f4, f5)}
    off = physptr - address
    sig, tlen, tspec, _, oem, product, oemptr, oemsize, count, lapic, _ = struct.unpack_from(
        "<4sHBB8s12sIHHII", blob, off
    )
    table = {"sig": sig, "length": tlen, "spec": tspec, "oem": oem, "product": product, "count": count}
    table |= {"lapic": lapic, "oemptr": oemptr, "oemsize": oemsize, "sum": sum(blob[off : off + tlen]) % 256}
    entries, pos = [], off + 44
    while pos < off + tlen:
        kind = blob[pos]
        if kind == 0:
            entries.append(("cpu", *struct.unpack_from("<BBBII", blob, pos + 1)))
        elif kind == 1:
            entries.append(("bus", blob[pos + 1], blob[pos + 2 : pos + 8]))
        elif kind == 2:
            entries.append(("ioapic", *struct.unpack_from("<BBBI", blob, pos + 1)))
        else:
            entries.append(("int" if kind == 3 else "lint", *struct.unpack_from("<BHBBBB", blob, pos + 1)))
        pos += SIZES[kind]
    assert pos == off + tlen, "entries overrun the table's length"
    return mpf, table, entries


@pytest.mark.parametrize("n", [1, 2, 4, 64])
def test_table_decodes_with_good_checksums(n):
    address, blob = mp_table(n)
    assert address == MP_TABLE_ADDR and len(blob) == mp_table_size(n)
    mpf, table, entries = decode(address, blob)
    assert mpf == {"sig": b"_MP_", "physptr": address + 16, "length": 1, "spec": 4, "features": (0, 0, 0, 0, 0)}
    assert sum(blob[:16]) % 256 == 0
    assert table["sig"] == b"PCMP" and table["spec"] == 4 and table["sum"] == 0
    assert table["lapic"] == 0xFEE00000 and (table["oemptr"], table["oemsize"]) == (0, 0)
    assert len(table["oem"]) == 8 and len(table["product"]) == 12
    assert table["count"] == len(entries) == n + 1 + 1 + 16 + 2
    assert 16 + table["length"] == len(blob)  # the floating pointer, then the table, nothing else


def test_entries_in_the_order_the_specification_wants():
    _, _, entries = decode(*mp_table(3))
    kinds = [e[0] for e in entries]
    assert kinds == ["cpu"] * 3 + ["bus", "ioapic"] + ["int"] * 16 + ["lint"] * 2


def test_processors():
    _, _, entries = decode(*mp_table(4))
    cpus = [e for e in entries if e[0] == "cpu"]
    assert [(apic, ver) for _, apic, ver, *_ in cpus] == [(i, 0x14) for i in range(4)]
    assert [flags for _, _, _, flags, _, _ in cpus] == [0b11, 0b01, 0b01, 0b01]  # enabled; BSP on 0 only
    assert {(sig, feat) for *_, sig, feat in cpus} == {(0x600, 0x201)}  # the documented default


def test_processors_carry_cpuid_leaf_1():
    _, _, entries = decode(*mp_table(2, cpu_signature=0x000A0F11, cpu_features=0x178BFBFF))
    assert {(sig, feat) for kind, *_, sig, feat in entries if kind == "cpu"} == {(0x000A0F11, 0x178BFBFF)}


def test_bus_and_ioapic():
    _, _, entries = decode(*mp_table(3))
    assert ("bus", 0, b"ISA   ") in entries
    assert ("ioapic", 3, 0x11, 1, 0xFEC00000) in entries  # id = nr_vcpus, KVM's version, usable


def test_isa_interrupts_follow_kvms_default_routing():
    _, _, entries = decode(*mp_table(2))
    ints = [e for e in entries if e[0] == "int"]
    # (irqtype INT, irqflag conforming, source bus ISA, IRQ n, the IOAPIC, pin n)
    assert ints == [("int", 0, 0, 0, irq, 2, irq) for irq in range(16)]


def test_isa_interrupts_the_pc_way():
    _, table, entries = decode(*mp_table(2, irq0_pin=2))
    ints = {e[4]: e[6] for e in entries if e[0] == "int"}
    assert ints[0] == 2 and 2 not in ints and all(ints[i] == i for i in range(3, 16)) and ints[1] == 1
    assert len(ints) == 15 and table["count"] == len(entries) and table["sum"] == 0


def test_local_interrupts():
    _, _, entries = decode(*mp_table(2))
    lints = [e for e in entries if e[0] == "lint"]
    assert lints == [("lint", 3, 0, 0, 0, 0, 0), ("lint", 1, 0, 0, 0, 0xFF, 1)]  # ExtINT->BSP LINT0, NMI->all LINT1


def test_linux_finds_it_where_it_scans_and_the_map_reserves_it():
    address, blob = mp_table(8)
    memory = bytearray(0x100000)
    memory[address : address + len(blob)] = blob
    assert linux_scan(bytes(memory)) == address and address % 16 == 0
    reserved = [e for e in pc_ram_map(BootLayout.ram_ranges(64 << 20)) if e.type == E820_RESERVED]
    assert any(e.base <= address and address + len(blob) <= e.end for e in reserved)


def test_every_vcpu_count_fits_the_bios_area():
    address, blob = mp_table(MAX_MP_VCPUS)
    assert address + len(blob) <= 0x100000
    _, table, entries = decode(address, blob)
    assert table["sum"] == 0 and sum(1 for e in entries if e[0] == "cpu") == MAX_MP_VCPUS


@pytest.mark.parametrize("n", [0, -1, MAX_MP_VCPUS + 1])
def test_impossible_vcpu_counts(n):
    with pytest.raises(ConfigError, match="MP table describes 1 to 254 vCPUs"):
        mp_table(n)


def test_other_addresses():
    address, blob = mp_table(1, address=0x9FC00)
    assert address == 0x9FC00 and decode(address, blob)[0]["physptr"] == 0x9FC10
    with pytest.raises(ValueError):
        mp_table(1, address=0x9FC08)
    with pytest.raises(ValueError):
        mp_table(1, irq0_pin=1)
