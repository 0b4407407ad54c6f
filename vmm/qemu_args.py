"""A qemu-system-x86_64 command line -> ``vmm run`` arguments (pure: no I/O, no file opened).

:func:`translate` maps the options test harnesses (kvm-unit-tests' ``x86/run``) pass and
refuses the rest with one line, ``qemu option X is not supported by vmm``; :func:`answer_query`
answers the probes they make first (``-h``, ``-version``, ``-device ?``). QEMU's syntax: ``-opt``
or ``--opt``, the value is always the next argument (``-m=64`` is unknown there too), ``,,`` is
a literal comma in a value, a later ``-kernel``/``-append``/``-initrd``/``-cpu`` wins, and
``-m``, ``-smp`` and ``-machine`` merge key by key.

Mapped: ``-kernel FILE`` (required) -> IMAGE; ``-append T`` -> ``--append=T``; ``-initrd "F A,G B"``
-> ``--module=F=F A --module=G=G B`` (split as hw/i386/multiboot.c does); ``-m [size=]N[kMGTPE]``
-> ``--mem`` (bare number MiB, rounded up to 8 KiB, default 128M); ``-smp [cpus=]N[,topology]``
-> ``--vcpus``; ``-accel kvm|tcg`` (repeatable: kvm then tcg is ``auto``), ``-machine accel=kvm:tcg``,
``-enable-kvm`` -> ``--backend``; ``kernel-irqchip=on|off`` -> ``--irqchip``; ``-fw_cfg X`` ->
``--fw-cfg=X`` verbatim (vmm checks it as QEMU does); ``-gdb DEV`` -> ``--gdb=DEV`` (vmm takes
``tcp::PORT`` and ``tcp:HOST:PORT``), ``-s`` -> ``--gdb=tcp::1234`` (the later of the two wins,
as in QEMU), ``-S`` -> ``-S`` (the guest waits for gdb; without a stub vmm refuses it);
``-serial none|file:F`` (once) -> ``--serial=none|F``.
Accepted as what vmm is: ``-cpu host|max`` (the backend's CPUID), ``-device isa-debug-exit,
iobase=0xf4,iosize=1|2|4``, ``-nodefaults``, ``-no-user-config``, ``-no-reboot`` (a reset always
ends the run), ``-nographic``, ``-display none``, ``-vnc none``, ``-vga none``, ``-serial stdio``
(once), ``-machine pc`` and ``usb|vmport|hpet|acpi|graphics|smbus|sata=off``.
Accepted with a warning: ``-machine q35|microvm|pc-i440fx-X.Y|pc-q35-X.Y``, ``dump-guest-core=``,
``mem-merge=``, ``-device pc-testdev|pci-testdev`` (not emulated), ``-global
kvm-pit.lost_tick_policy=discard`` (vmm keeps KVM's re-injection), tcg's ``thread|tb-size|
one-insn-per-tb|split-wx``, ``-smp`` topology and ``maxcpus`` above ``cpus``.
Refused: everything else, including other CPU models and any ``-cpu`` flag (vmm cannot edit
CPUID, and a test asking ``-x2apic`` would silently run with it), ``kernel-irqchip=split``,
``-m slots=|maxmem=`` and positional arguments (QEMU's disk images).

Every warning starts with ``warning:`` (kvm-unit-tests takes a stderr line without it for a
QEMU failure). Without an accelerator option vmm's ``auto`` applies (qemu-kvm's default; plain
qemu-system-x86_64 would use tcg). ``--timeout`` is never emitted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from vmm import qemu_opts as qo  # QEMU's option syntax
from vmm.cpu.layout import BootLayout
from vmm.errors import InputError

QEMU_DEFAULT_RAM = 128 << 20  # the pc machine's default_ram_size
RAM_ALIGN = 8192  # machine_set_mem rounds the size up to this
EXIT_IOBASE = 0xF4
MAX_VCPUS = BootLayout.MAX_VCPUS
_MACHINE_TYPES = re.compile(r"pc|q35|microvm|pc-(?:i440fx|q35)-\d+\.\d+")
_ABSENT_DEVICES = {"usb", "vmport", "hpet", "acpi", "graphics", "smbus", "sata"}  # =off is what vmm is
_HOST_ONLY = {"dump-guest-core", "mem-merge"}
_TCG_TUNING = {"thread", "tb-size", "one-insn-per-tb", "split-wx"}
_SMP_KEYS = ("cpus", "maxcpus", "drawers", "books", "sockets", "dies", "clusters", "modules", "cores", "threads")
_AS_VMM_IS = ("nodefaults", "no-user-config", "no-reboot", "nographic")  # flags that describe vmm as it is
PC_TESTDEV = "ports 0xe0-0xeb and 0x2000-0x2017, MMIO 0xff000000-0xff00ffff"


@dataclass(frozen=True)
class QemuTranslation:
    """``run_args``: arguments for ``vmm run``, options as ``--opt=value``, then ``--`` and
    the kernel (so no value or path is taken for an option). ``warnings``: one line each,
    starting with ``warning:``. ``kernel``: the ``-kernel`` path as given."""

    run_args: list[str]
    warnings: list[str]
    kernel: str


@dataclass
class _State:
    kernel: str | None = None
    append: str | None = None
    initrd: str | None = None
    cpu: str | None = None
    mem: dict[str, str] = field(default_factory=dict)
    smp: dict[str, str] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)
    accels: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    fw_cfg: list[str] = field(default_factory=list)
    serials: int = 0
    gdb: str | None = None
    gdb_wait: bool = False
    serial: str = "stdio"
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        line = "warning: " + text
        if line not in self.warnings:
            self.warnings.append(line)


def _only(*values: str) -> Callable[[_State, str, str], None]:
    def handler(state: _State, option: str, arg: str) -> None:
        if arg not in values:
            raise qo.refuse(f"{option} {arg}", f"only {' or '.join(values)}")

    return handler


def _machine(state: _State, option: str, arg: str) -> None:
    for key, value in qo.params(option, arg, "type"):
        state.machine[key.replace("_", "-")] = value  # keyval_dashify: kernel_irqchip is kernel-irqchip


def _enable_kvm(state: _State, option: str, arg: str) -> None:
    state.machine["accel"] = "kvm"  # QEMU's own sugar: the same dict entry as -machine accel=


def _accel(state: _State, option: str, arg: str) -> None:
    params = qo.params(option, arg, "accel")
    if not params or params[0][0] != "accel":
        raise qo.refuse(f"{option} {arg}", "name the accelerator first: kvm or tcg")
    state.accels.append((params[0][1], params[1:]))


def _serial(state: _State, option: str, arg: str) -> None:
    if arg in ("stdio", "none"):
        target = arg
    elif arg.startswith("file:") and len(arg) > len("file:"):
        target = arg[len("file:") :]
        if target in ("stdio", "none"):
            target = "./" + target  # a file of that name, not vmm's keyword
    else:
        raise qo.refuse(f"{option} {arg}", "only stdio, none or file:PATH")
    state.serials += 1
    if state.serials > 1:
        raise qo.refuse(f"{option} {arg}", "a second serial port")
    state.serial = target


def _device(state: _State, option: str, arg: str) -> None:
    params = qo.params(option, arg, "driver")
    driver = params[0][1] if params and params[0][0] == "driver" else arg
    props = dict(params[1:])
    if driver == "isa-debug-exit":
        unknown = set(props) - {"iobase", "iosize", "id"}
        if unknown:
            raise qo.refuse(f"{option} {driver},{sorted(unknown)[0]}=...", "only iobase, iosize and id")
        iobase = qo.number(option, "iobase", props.get("iobase", "0x501"))  # QEMU's default is 0x501
        iosize = qo.number(option, "iosize", props.get("iosize", "2"))
        if iobase != EXIT_IOBASE or iosize not in (1, 2, 4):
            raise qo.refuse(f"{option} {arg}", "vmm's exit port is iobase=0xf4 with iosize 1, 2 or 4")
    elif driver == "pc-testdev":
        state.warn(f"-device pc-testdev is ignored: vmm does not emulate it ({PC_TESTDEV}); tests that use it fail")
    elif driver == "pci-testdev":
        state.warn("-device pci-testdev is ignored: vmm has no PCI bus, so the guest finds no such device")
    else:
        raise qo.refuse(f"{option} {driver}")


def _global(state: _State, option: str, arg: str) -> None:
    params = dict(qo.params(option, arg, None))
    if set(params) == {"driver", "property", "value"}:
        params = {f"{params['driver']}.{params['property']}": params["value"]}
    if params == {"kvm-pit.lost_tick_policy": "discard"}:
        state.warn("-global kvm-pit.lost_tick_policy=discard is ignored: vmm keeps KVM's PIT tick re-injection")
    elif params != {"kvm-pit.lost_tick_policy": "delay"}:  # delay: what KVM, and so vmm, does
        raise qo.refuse(f"{option} {arg}")


# name -> (takes an argument, handler); names as QEMU's qemu-options.hx spells them.
_OPTIONS: dict[str, tuple[bool, Callable[[_State, str, str], None]]] = {
    "kernel": (True, lambda state, option, arg: setattr(state, "kernel", arg)),
    "append": (True, lambda state, option, arg: setattr(state, "append", arg)),
    "initrd": (True, lambda state, option, arg: setattr(state, "initrd", arg)),
    "cpu": (True, lambda state, option, arg: setattr(state, "cpu", arg)),
    "m": (True, lambda state, option, arg: state.mem.update(qo.params(option, arg, "size"))),
    "smp": (True, lambda state, option, arg: state.smp.update(qo.params(option, arg, "cpus"))),
    "machine": (True, _machine),
    "M": (True, _machine),
    "enable-kvm": (False, _enable_kvm),
    "accel": (True, _accel),
    "device": (True, _device),
    "global": (True, _global),
    "fw_cfg": (True, lambda state, option, arg: state.fw_cfg.append(arg)),
    "serial": (True, _serial),
    "display": (True, _only("none")),
    "vnc": (True, _only("none")),
    "vga": (True, _only("none")),
    "gdb": (True, lambda state, option, arg: setattr(state, "gdb", arg)),
    "s": (False, lambda state, option, arg: setattr(state, "gdb", "tcp::1234")),
    "S": (False, lambda state, option, arg: setattr(state, "gdb_wait", True)),
    **{name: (False, lambda state, option, arg: None) for name in _AS_VMM_IS},
    **{name: (False, lambda state, option, arg: None) for name in ("h", "help", "version")},  # answer_query's
}


def _scan(argv: Sequence[str]) -> Iterator[tuple[str, str, str]]:
    """(name, option as written, argument or "") per option, as QEMU's lookup_opt reads argv;
    an unknown name is yielded and ends the scan (nothing after it can be read)."""
    i = 0
    while i < len(argv):
        written = argv[i]
        if not written.startswith("-"):
            raise InputError(f"qemu disk image argument {qo.show(written)} is not supported by vmm (boot with -kernel)")
        name = written[2:] if written.startswith("--") else written[1:]
        spec = _OPTIONS.get(name)
        if spec is not None and spec[0] and i + 1 >= len(argv):
            raise InputError(f"qemu option {qo.show(written)} requires an argument")
        takes = spec is not None and spec[0]
        yield name, written, argv[i + 1] if takes else ""
        if spec is None:
            return
        i += 2 if takes else 1


def translate(argv: Sequence[str]) -> QemuTranslation:
    """Map a QEMU argv (without the program name) onto ``vmm run``'s arguments.
    InputError, one line naming the option, for anything outside the subset."""
    state = _State()
    for name, written, arg in _scan(argv):
        if name not in _OPTIONS or name in _QUERIES:
            raise qo.refuse(written)
        _OPTIONS[name][1](state, written, arg)
    if state.kernel is None:
        raise InputError("qemu option -kernel is required by vmm (it boots -kernel images only)")
    run_args = [f"--mem={_mem(state.mem)}", f"--vcpus={_vcpus(state.smp, state)}"]
    backend = _backend(state)
    _check_cpu(state.cpu, backend)
    run_args += [f"--backend={backend}"] if backend else []
    irqchip = _irqchip(state, backend)
    run_args += [f"--irqchip={irqchip}"] if irqchip else []
    _check_machine(state)
    if state.append is not None:
        run_args.append(f"--append={_carried('-append', state.append)}")
    run_args += [f"--module={path}={text}" for path, text in _modules(state.initrd)]
    run_args += [f"--fw-cfg={_carried('-fw_cfg', text)}" for text in state.fw_cfg]
    run_args += [f"--gdb={state.gdb}"] if state.gdb is not None else []
    run_args += ["-S"] if state.gdb_wait else []
    run_args += [f"--serial={state.serial}"] if state.serial != "stdio" else []
    return QemuTranslation(run_args=[*run_args, "--", state.kernel], warnings=state.warnings, kernel=state.kernel)


def _carried(option: str, text: str) -> str:
    if text == "--":  # argparse drops a value that is exactly "--", even as --opt=--
        raise qo.refuse(f"{option} --", "vmm's option parser cannot carry the value '--'")
    return text


def _mem(opts: dict[str, str]) -> str:
    extra = sorted(set(opts) - {"size"})
    if extra:
        raise qo.refuse(f"-m {extra[0]}={opts[extra[0]]}", "no memory hotplug: give the size only")
    text = opts.get("size")
    if text == "":
        raise InputError("qemu option -m size=: the size is empty")
    size = qo.size(text) if text else 0
    if size == 0:
        size = QEMU_DEFAULT_RAM  # QEMU: a zero or absent size is the machine's default
    elif text and text[-1] in "0123456789":
        size = qo.size(text + "M")  # QEMU's legacy fix-up: a size ending in a digit is MiB
    size = -(-size // RAM_ALIGN) * RAM_ALIGN
    for suffix, shift in (("G", 30), ("M", 20)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return f"{size >> 10}K"


def _vcpus(opts: dict[str, str], state: _State) -> int:
    """machine_parse_smp_config (cores preferred over sockets, as since QEMU 6.2) -> cpus."""
    shown = ",".join(f"{k}={v}" for k, v in opts.items())
    vals: dict[str, int] = {}
    for key, text in opts.items():
        if key not in _SMP_KEYS:
            raise qo.refuse(f"-smp {key}={text}")
        vals[key] = qo.number("-smp", key, text)
        if vals[key] == 0:
            raise InputError(f"qemu option -smp {shown}: CPU topology parameters must be greater than zero")
    for key in ("drawers", "books", "clusters"):
        if vals.get(key, 1) > 1:
            raise qo.refuse(f"-smp {key}={vals[key]}", "x86 machines have no such topology level")
    cpus, maxcpus = vals.get("cpus", 0), vals.get("maxcpus", 0)
    sockets, cores, threads = vals.get("sockets", 0), vals.get("cores", 0), vals.get("threads", 0)
    dies_modules = vals.get("dies", 1) * vals.get("modules", 1)
    if cpus == 0 and maxcpus == 0:
        sockets, cores, threads = sockets or 1, cores or 1, threads or 1
    else:
        maxcpus = maxcpus or cpus
        if cores == 0:
            sockets, threads = sockets or 1, threads or 1
            cores = maxcpus // (sockets * dies_modules * threads)
        elif sockets == 0:
            threads = threads or 1
            sockets = maxcpus // (dies_modules * cores * threads)
        threads = threads or maxcpus // (sockets * dies_modules * cores)
    total = sockets * dies_modules * cores * threads
    maxcpus = maxcpus or total
    cpus = cpus or maxcpus
    if total != maxcpus or cpus > maxcpus:
        raise InputError(
            f"qemu option -smp {shown}: invalid CPU topology: sockets*dies*modules*cores*threads = {total}, "
            f"maxcpus = {maxcpus}, cpus = {cpus}"
        )
    if cpus > MAX_VCPUS:  # worded as QEMU's, so harnesses that probe for the limit find it
        raise qo.refuse(f"-smp {shown}", f"Invalid SMP CPUs {cpus}. The max CPUs supported by vmm is {MAX_VCPUS}")
    if maxcpus > cpus:
        state.warn(f"-smp maxcpus={maxcpus} is ignored: no CPU hotplug, the guest has {cpus} vCPUs")
    if any(vals.get(k, 1) > 1 for k in ("sockets", "dies", "modules", "cores", "threads")):
        state.warn(f"-smp {shown}: the topology is not modelled; the guest just has {cpus} vCPUs")
    return cpus


def _backend(state: _State) -> str | None:
    if state.accels and "accel" in state.machine:
        raise InputError('qemu options -accel and "-machine accel=" (or -enable-kvm) are incompatible')
    if state.accels:
        names, where = [name for name, _ in state.accels], "-accel "
    else:
        names, where = [n for n in state.machine.get("accel", "").split(":") if n], "-machine accel="
    for name in names:
        if name not in ("kvm", "tcg"):
            raise qo.refuse(where + name, "only kvm and tcg")
    if not names:
        return None
    if names[0] == "tcg":
        return "emulator"  # tcg never fails to start, so what follows it is never tried
    return "auto" if "tcg" in names else "kvm"


def _irqchip(state: _State, backend: str | None) -> str | None:
    value, where = state.machine.get("kernel-irqchip"), "-machine kernel-irqchip="
    for name, params in state.accels:
        for key, text in params:  # QOM property names: no dashify here, unlike -machine
            if name == "kvm" and key == "kernel-irqchip":
                value, where = text, "-accel kvm,kernel-irqchip="
            elif name == "tcg" and key in _TCG_TUNING:
                state.warn(f"-accel tcg,{key}={text} is ignored: emulator tuning QEMU's TCG has and vmm's has not")
            else:
                raise qo.refuse(f"-accel {name},{key}={text}")
    if value is None:
        return None
    if value not in ("on", "off"):
        raise qo.refuse(where + value, "only on or off: vmm has no split irqchip")
    if backend == "emulator":
        state.warn(f"kernel-irqchip={value} is ignored: it is a KVM setting and the run uses the emulator")
        return None
    return value


def _check_cpu(cpu: str | None, backend: str | None) -> None:
    if cpu is None or cpu == "max":
        return
    if cpu != "host":
        if cpu.split(",")[0] in ("host", "max"):
            raise qo.refuse(f"-cpu {cpu}", "no CPU feature flags or properties: the guest sees the backend's CPUID")
        raise qo.refuse(f"-cpu {cpu}", "only host and max: the guest sees the backend's CPUID")
    if backend == "emulator":
        raise InputError("qemu option -cpu host needs KVM (QEMU: CPU model 'host' requires KVM); use -cpu max")


def _check_machine(state: _State) -> None:
    for key, value in state.machine.items():
        if key in ("accel", "kernel-irqchip"):
            continue
        if key == "type":
            if not _MACHINE_TYPES.fullmatch(value):
                raise qo.refuse(f"-machine {value}", "machine types: pc, q35, microvm")
            if value != "pc":
                state.warn(f"-machine {value} runs on vmm's one PC-like platform (no PCI, no ACPI)")
        elif key in _ABSENT_DEVICES and value == "off":
            pass
        elif key in _HOST_ONLY:
            state.warn(f"-machine {key}={value} is ignored: a host-side memory hint")
        else:
            raise qo.refuse(f"-machine {key}={value}")


def _modules(initrd: str | None) -> list[tuple[str, str]]:
    """-initrd as hw/i386/multiboot.c splits it: get_opt_value per module (``,,`` is a comma,
    a trailing ``,`` ends the list); the module's string is its whole text, its file the text
    up to the first space."""
    if initrd is None:
        return []
    modules: list[tuple[str, str]] = []
    i = 0
    while i < len(initrd):
        text, i = qo.value_end(initrd, i)
        i += 1 if i < len(initrd) else 0
        path = text.split(" ", 1)[0]
        if not path:
            raise InputError(f"qemu option -initrd {qo.show(initrd)}: module {len(modules) + 1} has no file name")
        if "=" in path:
            raise qo.refuse(f"-initrd {path}", "vmm's --module FILE=STRING cannot carry a file name with '='")
        modules.append((path, text))
    return modules


HELP = """\
vmm qemu: a QEMU-compatible front door to vmm (not QEMU): runs -kernel images with `vmm run`
usage: vmm-qemu -kernel FILE [options]   (a subset of qemu-system-x86_64's options)
-kernel FILE -append TEXT -initrd "FILE ARGS,FILE2 ARGS2" -m [size=]SIZE -smp [cpus=]N[,...]
-cpu host|max -machine [type=]pc|q35|microvm[,accel=kvm:tcg][,kernel-irqchip=on|off]
-accel kvm|tcg -enable-kvm -device isa-debug-exit,iobase=0xf4,iosize=N -fw_cfg name=N,file=F|string=S
-nodefaults -no-user-config -no-reboot -nographic -display none -vnc none -vga none -serial stdio
-gdb tcp::PORT|tcp:HOST:PORT -s (= -gdb tcp::1234) -S (with a gdb stub: wait for gdb to continue)
"""
VERSION = "vmm qemu: a QEMU-compatible front door to vmm (not QEMU; no QEMU version)\n"
DEVICES = """\
Misc devices:
name "isa-debug-exit", bus ISA, desc "vmm's exit port: iobase=0xf4, iosize 1, 2 or 4"
name "pc-testdev", bus ISA, desc "accepted and ignored: not emulated by vmm"
"""
_QUERIES = {"h": HELP, "help": HELP, "version": VERSION}


def answer_query(argv: Sequence[str]) -> str | None:
    """What QEMU would print (to stdout, then exit 0) for ``-h``/``-help``, ``-version`` and
    ``-device help``/``-device ?`` in ``argv``; None when ``argv`` asks none of these (or an
    option before the query is unknown: :func:`translate` then refuses it)."""
    try:
        for name, _written, arg in _scan(argv):
            if name in _QUERIES:
                return _QUERIES[name]
            if name == "device" and arg in ("help", "?"):
                return DEVICES
    except InputError:
        pass
    return None
