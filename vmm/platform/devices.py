"""Which devices a machine has, and where: the PC's legacy ports, listed once.

=============  =====================================================================
port(s)        device
=============  =====================================================================
0x3f8-0x3ff    COM1, a 16550 UART: the console (IRQ 4)
0xf4-0xf7      the exit port (QEMU's isa-debug-exit, iosize 1, 2 or 4)
0x80           POST code latch
0x500-0x503    the marker port (the project's own: guests timestamp events)
0x510-0x511    fw_cfg selector and data; 0x514-0x51b its DMA address register
0x70-0x71      CMOS RTC and NVRAM (index with the NMI mask, data)
0x60, 0x64     i8042: data; status and command (0xfe pulses reset)
0x92           system control port A: A20 gate, fast reset
0x61           system control port B (on KVM with the in-kernel PIT the kernel answers)
=============  =====================================================================

The interrupt controllers and the PIT are not here: on KVM they are in the kernel
(:class:`vmm.backends.kvm.KvmBackend`); the emulator models its local APICs itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vmm.devices import Bus, ExitPort, Marker, PostCode, Serial16550
from vmm.devices.cmos import CMOS_PORT, Cmos
from vmm.devices.exit_port import EXIT_PORT
from vmm.devices.fw_cfg import FW_CFG_DMA_PORT, FW_CFG_PORT, FwCfg
from vmm.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from vmm.devices.marker import MARK_PORT
from vmm.devices.post import POST_PORT
from vmm.devices.serial import COM1, ByteSource
from vmm.devices.sysctl import PORT_A, PORT_B, SystemControlA, SystemControlB
from vmm.memory import GuestMemory
from vmm.platform.fw_cfg import fw_cfg_items, parse_fw_cfg_options
from vmm.platform.fw_cfg import load_fw_cfg_files as _load

COM1_IRQ = 4


def load_fw_cfg_files(options: Sequence[str], warn: Callable[[str], None]) -> list[tuple[str, bytes]]:
    """Parse and read every ``--fw-cfg`` option (before any fd exists); QEMU's warnings
    (a name outside ``opt/``) go to ``warn``. InputError for a bad option or file."""
    parsed = parse_fw_cfg_options(options)
    for _name, source in parsed:
        if source.warning:
            warn(source.warning)
    return _load(parsed)


def attach_pc_devices(
    bus: Bus,
    *,
    memory: GuestMemory,
    console: Callable[[bytes], None],
    marker: Marker,
    request_exit: Callable[[int], None],
    request_reset: Callable[[str], None],
    ram_size: int,
    nr_vcpus: int,
    fw_cfg_files: Sequence[tuple[str, bytes]] = (),
    interrupt_line: Callable[[int], Callable[[int], None] | None] | None = None,
    serial_input: ByteSource | None = None,
) -> Serial16550:
    """Register every legacy device on ``bus``. ``interrupt_line(irq)`` gives a device its
    ISA interrupt line (the backend's; None where there is no interrupt controller);
    ``serial_input`` feeds COM1's receive side. Returns COM1 (the host's input thread
    tells it when bytes arrived)."""
    line = interrupt_line or (lambda irq: None)
    serial = Serial16550(console, irq=line(COM1_IRQ), source=serial_input)
    bus.register_pio(COM1, Serial16550.WIDTH, serial)
    bus.register_pio(EXIT_PORT, ExitPort.WIDTH, ExitPort(request_exit))
    bus.register_pio(POST_PORT, 1, PostCode())
    bus.register_pio(MARK_PORT, Marker.WIDTH, marker)
    fw_cfg = FwCfg(fw_cfg_items(ram_size, nr_vcpus, nr_vcpus, fw_cfg_files), memory)
    bus.register_pio(FW_CFG_PORT, FwCfg.WIDTH, fw_cfg)
    bus.register_pio(FW_CFG_DMA_PORT, fw_cfg.dma.WIDTH, fw_cfg.dma)
    bus.register_pio(CMOS_PORT, Cmos.WIDTH, Cmos(ram_size=ram_size, nr_vcpus=nr_vcpus))
    i8042 = I8042(lambda: request_reset("i8042 reset command 0xfe"))
    bus.register_pio(I8042_DATA_PORT, 1, i8042.data_port)
    bus.register_pio(I8042_COMMAND_PORT, 1, i8042)
    bus.register_pio(PORT_A, 1, SystemControlA(lambda: request_reset("fast reset through port 0x92")))
    bus.register_pio(PORT_B, 1, SystemControlB())
    return serial
