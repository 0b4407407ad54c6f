"""An Intel MultiProcessor table (MP specification 1.4), so a PC guest finds its CPUs and its
IOAPIC without ACPI.

The table is one blob placed at a 16-byte aligned address: the 16-byte floating pointer
structure (``"_MP_"``) first, the configuration table (``"PCMP"``) right after it. The default
place is the start of the BIOS area, ``0xf0000``: Linux's ``mpparse_find_mptable`` scans
``[0, 0x400)``, ``[0x9fc00, 0xa0000)`` and ``[0xf0000, 0x100000)`` at 16-byte steps, and the
PC RAM map (:func:`vmm.platform.memmap.pc_ram_map`) reports the BIOS area reserved, so the
guest never reuses it; it has room for any vCPU count this VMM allows (the last KiB of base
memory, Firecracker's place, holds at most 40 processors).

Entries, in the order the specification wants them (all processors, then buses, IOAPICs,
interrupt assignments):

* one processor per vCPU: APIC id = index, local APIC version 0x14 (what KVM's local APIC
  reports), enabled, the BSP flag on vCPU 0, the CPU signature and feature flags of CPUID
  leaf 1 (EAX, EDX) when the caller passes them, else family 6 with FPU and APIC (the
  values kvmtool and Firecracker write; Linux reads neither);
* one bus, ``ISA``, id 0;
* one IOAPIC, id ``nr_vcpus`` (the first id after the processors'), version 0x11 (what KVM's
  IOAPIC reports), usable, at 0xfec00000;
* the 16 ISA interrupts, conforming polarity and trigger (ISA: edge, active high): IRQ n
  goes to IOAPIC pin n. That is KVM's default GSI routing (``kvm_setup_default_irq_routing``:
  GSI n to IOAPIC pin n and PIC pin n), which this VMM keeps, and what Firecracker's table
  says. A PC wires the timer, IRQ 0, to pin 2 (QEMU installs that routing itself, and SeaBIOS
  then lists IRQ 0 on pin 2 and leaves IRQ 2 out); pass ``irq0_pin=2`` for a machine whose
  routing does the same. The table must agree with the routing: Linux's ``check_timer``
  looks for the timer on the pin the table names;
* the local interrupts: ExtINT on LINT0 of the BSP, NMI on LINT1 of every local APIC.

The floating pointer's feature bytes are zero: a configuration table is present (feature 1 =
0) and the IMCR is absent (feature 2 bit 7 = 0: virtual wire mode; a VM has no IMCR port).
"""

from __future__ import annotations

import struct

from vmm.errors import ConfigError

MP_TABLE_ADDR = 0xF0000
LAPIC_BASE = 0xFEE00000
IOAPIC_BASE = 0xFEC00000
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
MP_SPEC_REVISION = 4  # MP 1.4
MAX_MP_VCPUS = 254  # 8-bit APIC ids, 0xff is broadcast, and the IOAPIC takes one
DEFAULT_CPU_SIGNATURE = 0x600  # family 6, model 0, stepping 0
DEFAULT_CPU_FEATURES = 0x201  # CPUID.1:EDX FPU (bit 0) | APIC (bit 9)
ISA_IRQS = 16
OEM_ID = b"VMM     "  # 8 bytes, space padded
PRODUCT_ID = b"VMM PC      "  # 12 bytes

MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
MPC_APIC_USABLE = 1
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
ISA_BUS_ID = 0
ALL_APICS = 0xFF

FLOATING = struct.Struct("<4sIBBBBBBBB")  # struct mpf_intel, 16 bytes
HEADER = struct.Struct("<4sHBB8s12sIHHII")  # struct mpc_table, 44 bytes
PROCESSOR = struct.Struct("<BBBBII8x")  # struct mpc_cpu, 20 bytes
BUS = struct.Struct("<BB6s")  # struct mpc_bus, 8 bytes
IOAPIC = struct.Struct("<BBBBI")  # struct mpc_ioapic, 8 bytes
INTSRC = struct.Struct("<BBHBBBB")  # struct mpc_intsrc and mpc_lintsrc, 8 bytes each


def _checksum_byte(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with its checksum byte still zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def mp_table_size(nr_vcpus: int, *, irq0_pin: int = 0) -> int:
    """Bytes :func:`mp_table` returns for ``nr_vcpus`` processors."""
    n_intsrc = ISA_IRQS if irq0_pin == 0 else ISA_IRQS - 1
    return FLOATING.size + HEADER.size + nr_vcpus * PROCESSOR.size + BUS.size + IOAPIC.size + (n_intsrc + 2) * 8


def mp_table(
    nr_vcpus: int,
    *,
    address: int = MP_TABLE_ADDR,
    cpu_signature: int | None = None,
    cpu_features: int | None = None,
    irq0_pin: int = 0,
) -> tuple[int, bytes]:
    """The MP floating pointer and configuration table for ``nr_vcpus`` processors, to be
    written at ``address``: returns ``(address, bytes)``. ``cpu_signature``/``cpu_features``
    are CPUID leaf 1's EAX and EDX (defaults in the module docstring); ``irq0_pin`` is the
    IOAPIC pin the timer's IRQ 0 reaches (0 with KVM's default routing, 2 as on a PC).
    Pure. ConfigError for a vCPU count the table cannot describe."""
    if not 1 <= nr_vcpus <= MAX_MP_VCPUS:
        raise ConfigError(f"an MP table describes 1 to {MAX_MP_VCPUS} vCPUs, not {nr_vcpus}")
    if irq0_pin not in (0, 2):
        raise ValueError(f"irq0_pin is 0 (KVM's default routing) or 2 (a PC's), not {irq0_pin}")
    if address % 16 or not 0 <= address <= (1 << 32) - mp_table_size(nr_vcpus, irq0_pin=irq0_pin):
        raise ValueError(f"MP table address {address:#x} must be 16-byte aligned and the table below 4 GiB")
    signature = DEFAULT_CPU_SIGNATURE if cpu_signature is None else cpu_signature & 0xFFFFFFFF
    features = DEFAULT_CPU_FEATURES if cpu_features is None else cpu_features & 0xFFFFFFFF
    ioapic_id = nr_vcpus

    entries = bytearray()
    for cpu in range(nr_vcpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += PROCESSOR.pack(MP_PROCESSOR, cpu, LAPIC_VERSION, flags, signature, features)
    entries += BUS.pack(MP_BUS, ISA_BUS_ID, b"ISA   ")
    entries += IOAPIC.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE, IOAPIC_BASE)
    for irq in range(ISA_IRQS):
        pin = irq
        if irq0_pin == 2:
            if irq == 2:
                continue  # the PC's cascade input: nothing reaches pin 2 but the timer
            pin = 2 if irq == 0 else irq
        # irqflag 0: polarity and trigger conform to the bus (ISA: active high, edge).
        entries += INTSRC.pack(MP_INTSRC, MP_INT, 0, ISA_BUS_ID, irq, ioapic_id, pin)
    entries += INTSRC.pack(MP_LINTSRC, MP_EXTINT, 0, ISA_BUS_ID, 0, 0, 0)  # the PIC into the BSP's LINT0
    entries += INTSRC.pack(MP_LINTSRC, MP_NMI, 0, ISA_BUS_ID, 0, ALL_APICS, 1)  # NMI into every LINT1
    n_intsrc = ISA_IRQS if irq0_pin == 0 else ISA_IRQS - 1
    count = nr_vcpus + 1 + 1 + n_intsrc + 2  # processors, the bus, the IOAPIC, interrupts, local interrupts

    table_addr = address + FLOATING.size
    length = HEADER.size + len(entries)
    header = bytearray(
        HEADER.pack(b"PCMP", length, MP_SPEC_REVISION, 0, OEM_ID, PRODUCT_ID, 0, 0, count, LAPIC_BASE, 0)
    )
    header[7] = _checksum_byte(header + entries)

    floating = bytearray(FLOATING.pack(b"_MP_", table_addr, 1, MP_SPEC_REVISION, 0, 0, 0, 0, 0, 0))
    floating[10] = _checksum_byte(floating)
    return address, bytes(floating + header + entries)
