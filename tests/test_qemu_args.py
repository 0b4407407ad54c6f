"""vmm.qemu_args: QEMU command lines (kvm-unit-tests' among them) -> `vmm run` arguments.

Pure translation, no KVM: every accepted option's mapping, the combinations kvm-unit-tests'
x86/run and unittests.cfg produce, QEMU's -initrd comma escapes, and the one-line refusals.
"""

from __future__ import annotations

import argparse
import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.cli.run import add_run_options
from vmm.config import parse_size
from vmm.errors import InputError
from vmm.qemu_args import answer_query, translate

# kvm-unit-tests x86/run (2025): `${qemu} --no-reboot -nodefaults $pit $pc_testdev -display none
# -serial stdio $pci_testdev -machine accel=$ACCEL$ACCEL_PROPS -kernel`, then runtime.bash's
# `$kernel -smp $smp $opts` and arch-run.bash's `-initrd $KVM_UNIT_TESTS_ENV`.
KUT_RUN = (
    "--no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard -device pc-testdev "
    "-device isa-debug-exit,iobase=0xf4,iosize=0x4 -display none -serial stdio -device pci-testdev "
    "-machine accel=kvm -kernel"
)
# The same script before 2025: -vnc none, no -global, no --no-reboot.
KUT_RUN_OLD = (
    "-nodefaults -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 -vnc none "
    "-serial stdio -device pci-testdev -machine accel=tcg -kernel"
)
MAX_VCPUS = 64  # README: `vmm run --vcpus` takes 1 to 64


def run_args(cmdline: str) -> list[str]:
    return translate(shlex.split(cmdline)).run_args


def vmm_run(cmdline: str) -> argparse.Namespace:
    """The translation parsed by `vmm run`'s own options: what the run would get."""
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    return parser.parse_args(run_args(cmdline))


def refusal(cmdline: str) -> str:
    with pytest.raises(InputError) as info:
        translate(shlex.split(cmdline))
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- kvm-unit-tests command lines ---------------------------------------------------------------


def test_kvm_unit_tests_run_line_maps_onto_vmm_run() -> None:
    t = translate(shlex.split(f"{KUT_RUN} x86/smptest.flat -smp 2 -initrd /tmp/tmp.kut-env"))
    assert t.run_args == [
        "--mem=128M",
        "--vcpus=2",
        "--backend=kvm",
        "--module=/tmp/tmp.kut-env=/tmp/tmp.kut-env",
        "--",
        "x86/smptest.flat",
    ]
    assert t.kernel == "x86/smptest.flat"
    assert len(t.warnings) == 3  # the PIT policy, pc-testdev, pci-testdev
    assert all(w.startswith("warning: ") for w in t.warnings)  # kvm-unit-tests ignores only such lines
    assert any("pc-testdev" in w and "0xe0" in w for w in t.warnings)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [  # unittests.cfg entries whose extra_params vmm can honour
        ("-smp 1 -append 'cpuid'", {"append": "cpuid", "vcpus": "1"}),
        ("-smp 1 -cpu max", {"vcpus": "1"}),
        ("-smp 1 -m 2048", {"mem": "2G"}),
        ('-smp 2 --append "10000000 1700000000"', {"append": "10000000 1700000000", "vcpus": "2"}),
        ("-smp 2 -enable-kvm -m 2048 -cpu host", {"mem": "2G", "backend": "kvm"}),
        ('-smp 2 -cpu max -m 4g -append "-pause_filter_test"', {"mem": "4G", "append": "-pause_filter_test"}),
    ],
)
def test_unittests_cfg_extra_params(extra: str, expected: dict[str, str]) -> None:
    ns = vmm_run(f"{KUT_RUN} x86/vmexit.flat {extra}")
    assert ns.image == "x86/vmexit.flat"
    for key, value in expected.items():
        assert getattr(ns, key) == value


def test_old_kvm_unit_tests_run_line() -> None:
    ns = vmm_run(f"{KUT_RUN_OLD} x86/sieve.flat -smp 1")
    assert (ns.image, ns.backend, ns.vcpus, ns.mem, ns.module) == ("x86/sieve.flat", "emulator", "1", "128M", [])


@pytest.mark.parametrize(
    ("extra", "named"),
    [  # unittests.cfg entries vmm cannot honour: refused, so the harness reports the reason
        ("-cpu qemu64,+x2apic,+tsc-deadline -machine kernel_irqchip=split", "-cpu qemu64,+x2apic,+tsc-deadline"),
        ("-cpu max,vendor=GenuineIntel", "-cpu max,vendor=GenuineIntel"),
        ("-cpu host,migratable=no", "-cpu host,migratable=no"),
        ("-machine vmport=on -cpu max", "-machine vmport=on"),
        ("-cpu max,+svm -m 4g", "-cpu max,+svm"),
        ("-cpu max,+svm -overcommit cpu-pm=on", "-overcommit"),  # options are refused as read, -cpu at the end
        ("-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off", "-device intel-iommu"),
        ("-cpu kvm64,hv_vpindex,hv_synic -device hyperv-testdev", "-device hyperv-testdev"),
        ("-cpu kvm64,hv_vpindex,hv_time", "-cpu kvm64,hv_vpindex,hv_time"),
    ],
)
def test_unittests_cfg_refusals_name_the_option(extra: str, named: str) -> None:
    assert refusal(f"{KUT_RUN} x86/apic.flat -smp 2 {extra}").startswith(f"qemu option {named} is not supported")


def test_premature_failure_probe_passes_the_kernel_path_through() -> None:
    # runtime.bash runs the line with kernel _NO_FILE_4Uhere_ and expects "could not open kernel"
    # from loading it: the translation must not fail first.
    t = translate(shlex.split(f"{KUT_RUN} _NO_FILE_4Uhere_ -smp 1"))
    assert t.kernel == "_NO_FILE_4Uhere_" and t.run_args[-2:] == ["--", "_NO_FILE_4Uhere_"]


def test_max_smp_probe_finds_the_limit() -> None:
    # vmm.bash: `x86/run _NO_FILE_4Uhere_ -smp $MAX_SMP |& grep 'SMP CPUs'`, then the last word
    # with parentheses stripped is the limit.
    message = refusal(f"{KUT_RUN} _NO_FILE_4Uhere_ -smp {MAX_VCPUS + 1}")
    assert "SMP CPUs" in message
    assert int(message.split()[-1].strip("()")) == MAX_VCPUS
    assert vmm_run(f"{KUT_RUN} k -smp {MAX_VCPUS}").vcpus == str(MAX_VCPUS)


def test_answers_the_probes_harnesses_make() -> None:
    devices = answer_query(["-device", "?"])
    assert devices is not None and devices == answer_query(["-device", "help"])
    assert '"pc-testdev"' in devices and '"isa-debug-exit"' in devices  # x86/run's greps
    assert "pci-testdev" not in devices  # else x86/run would pass one (there is no PCI)
    help_text = answer_query(["--help"])
    assert help_text is not None and "QEMU" in help_text and help_text == answer_query(["-h"])  # search_qemu_binary
    assert "not QEMU" in (answer_query(["-version"]) or "")
    assert answer_query(shlex.split(f"{KUT_RUN} k -smp 2")) is None
    assert answer_query(["-bios", "x", "-h"]) is None  # an option vmm refuses comes first: translate says so


# ---- each option -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "mem"),
    [
        ("64", "64M"),
        ("64M", "64M"),
        ("64m", "64M"),
        ("size=64M", "64M"),
        ("4g", "4G"),
        ("4G", "4G"),
        ("1.5G", "1536M"),
        (".5g", "512M"),
        ("2.G", "2G"),
        ("2048", "2G"),
        ("1000K", "1000K"),
        ("100000b", "104K"),  # rounded up to 8 KiB, as machine_set_mem does
        ("0x40", "64M"),  # still ends in a digit: MiB
        ("0", "128M"),  # QEMU: a zero size is the default
    ],
)
def test_memory_sizes(m: str, mem: str) -> None:
    assert vmm_run(f"-kernel k -m {m}").mem == mem


def test_memory_default_and_merge() -> None:
    assert vmm_run("-kernel k").mem == "128M"  # QEMU's pc default, not vmm's 64M
    assert vmm_run("-kernel k -m 64 -m size=256").mem == "256M"  # -m merges key by key


@given(st.integers(1, 1 << 16))
def test_bare_memory_number_is_mib(mib: int) -> None:
    assert parse_size(vmm_run(f"-kernel k -m {mib}").mem) == mib << 20


@pytest.mark.parametrize(
    ("smp", "vcpus"),
    [
        ("4", "4"),
        ("cpus=4", "4"),
        ("4,sockets=1", "4"),
        ("4,sockets=2,cores=2,threads=1", "4"),
        ("4,sockets=2,cores=2,threads=1,maxcpus=4", "4"),
        ("sockets=2,cores=2", "4"),
        ("threads=2", "2"),
        ("2,maxcpus=4", "2"),
        ("0x2", "2"),
    ],
)
def test_smp(smp: str, vcpus: str) -> None:
    assert vmm_run(f"-kernel k -smp {smp}").vcpus == vcpus


def test_smp_warnings() -> None:
    assert translate(["-kernel", "k", "-smp", "4", "-smp", "cpus=2"]).warnings == []
    (topology,) = translate(["-kernel", "k", "-smp", "4,sockets=2,cores=2"]).warnings
    assert "not modelled" in topology and "4 vCPUs" in topology
    (hotplug,) = translate(["-kernel", "k", "-smp", "2,maxcpus=4"]).warnings
    assert "maxcpus=4" in hotplug and "2 vCPUs" in hotplug


@pytest.mark.parametrize(
    ("smp", "fragment"),
    [
        ("4,sockets=3", "invalid CPU topology"),
        ("4,maxcpus=2", "invalid CPU topology"),
        ("5,sockets=2,cores=2,threads=1", "invalid CPU topology"),
        ("0", "greater than zero"),
        ("4,cores=0", "greater than zero"),
        ("four", "not a number"),
        ("4,clusters=2", "-smp clusters=2"),
        ("4,nodes=2", "-smp nodes=2"),
    ],
)
def test_smp_refusals(smp: str, fragment: str) -> None:
    assert fragment in refusal(f"-kernel k -smp {smp}")


@pytest.mark.parametrize(
    ("accel", "backend"),
    [
        ("-accel kvm", "kvm"),
        ("--accel tcg", "emulator"),
        ("-accel kvm -accel tcg", "auto"),  # QEMU tries them in order
        ("-accel tcg -accel kvm", "emulator"),  # tcg always starts, so kvm is never tried
        ("-accel kvm -accel kvm", "kvm"),
        ("-machine accel=kvm", "kvm"),
        ("-machine accel=tcg", "emulator"),
        ("-machine accel=kvm:tcg", "auto"),
        ("-enable-kvm", "kvm"),
        ("-enable-kvm -machine accel=tcg", "emulator"),  # the same machine option: the later wins
        ("-machine accel=tcg -enable-kvm", "kvm"),
        ("", "auto"),  # nothing given: vmm's default
    ],
)
def test_accelerators(accel: str, backend: str) -> None:
    ns = vmm_run(f"-kernel k {accel}")
    assert (ns.backend or "auto") == backend  # not given (None): MachineConfig's default, auto
    if not accel:
        assert not any(arg.startswith("--backend") for arg in run_args("-kernel k"))


@pytest.mark.parametrize(
    ("option", "irqchip"),
    [
        ("-machine kernel_irqchip=off", False),
        ("-M q35,kernel-irqchip=on", True),
        ("-accel kvm,kernel-irqchip=off", False),
        ("-machine kernel-irqchip=on -accel kvm,kernel-irqchip=off", False),  # -accel's own property wins
    ],
)
def test_kernel_irqchip(option: str, irqchip: bool) -> None:
    assert vmm_run(f"-kernel k {option}").irqchip is irqchip


def test_kernel_irqchip_is_kvm_only() -> None:
    t = translate(shlex.split("-kernel k -accel tcg -machine kernel_irqchip=off"))
    assert not any(arg.startswith("--irqchip") for arg in t.run_args)
    assert any("kernel-irqchip=off is ignored" in w for w in t.warnings)
    (tuning,) = translate(shlex.split("-kernel k -accel tcg,thread=multi")).warnings
    assert tuning.startswith("warning: -accel tcg,thread=multi is ignored")


def test_cpu_models() -> None:
    assert vmm_run("-kernel k -cpu host -accel kvm").image == "k"
    assert vmm_run("-kernel k -cpu max -accel tcg").image == "k"
    assert vmm_run("-kernel k -cpu qemu64 -cpu max").image == "k"  # the last -cpu wins
    assert "requires KVM" in refusal("-kernel k -cpu host -accel tcg")  # as QEMU refuses it


@pytest.mark.parametrize(
    ("machine", "warned"),
    [
        ("pc", False),
        ("type=pc,usb=off,vmport=off,hpet=off,acpi=off", False),
        ("q35", True),
        ("microvm", True),
        ("pc-i440fx-9.0", True),
        ("pc-q35-8.2,smbus=off,sata=off", True),
        ("pc,dump-guest-core=off", True),
        ("pc,mem_merge=off", True),  # -machine keys are dashified, as QEMU's keyval_dashify does
    ],
)
def test_machine_types_and_properties(machine: str, warned: bool) -> None:
    t = translate(["-kernel", "k", "-machine", machine])
    assert bool(t.warnings) is warned


def test_display_console_and_reboot_flags_change_nothing() -> None:
    flags = "-nodefaults -no-user-config -nographic -display none -vnc none -vga none -serial stdio -no-reboot"
    t = translate(shlex.split(f"{flags} --no-reboot --nodefaults -kernel k"))
    assert t.run_args == ["--mem=128M", "--vcpus=1", "--", "k"] and t.warnings == []


@pytest.mark.parametrize(
    "device",
    ["isa-debug-exit,iobase=0xf4,iosize=0x4", "isa-debug-exit,iobase=244,iosize=1", "isa-debug-exit,iobase=0xf4"],
)
def test_exit_device(device: str) -> None:
    t = translate(["-kernel", "k", "-device", device])
    assert t.run_args == ["--mem=128M", "--vcpus=1", "--", "k"] and t.warnings == []


def test_append_initrd_kernel_last_one_wins() -> None:
    ns = vmm_run("-kernel a -append x -initrd m1 -kernel b -append 'y z' -initrd m2")
    assert (ns.image, ns.append, ns.module) == ("b", "y z", [("m2", "m2")])


def test_append_absent_or_empty() -> None:
    assert not any(arg.startswith("--append") for arg in run_args("-kernel k"))
    assert vmm_run("-kernel k -append ''").append == ""


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("-s", ["--gdb=tcp::1234"]),
        ("-s -S", ["--gdb=tcp::1234", "-S"]),
        ("-gdb tcp::9000", ["--gdb=tcp::9000"]),
        ("-gdb tcp::9000 -s", ["--gdb=tcp::1234"]),  # the later one wins, as in QEMU
        ("-s -gdb tcp:0.0.0.0:9000", ["--gdb=tcp:0.0.0.0:9000"]),
        ("-S", ["-S"]),  # vmm run then refuses it: nothing could continue the guest
    ],
)
def test_gdb_options(cmdline: str, expected: list[str]) -> None:
    args = run_args(f"-kernel k {cmdline}")
    assert args[args.index("--") - len(expected) : args.index("--")] == expected
    ns = vmm_run(f"-kernel k {cmdline}")
    assert ns.gdb_wait == ("-S" in expected)


def test_fw_cfg_passes_through_verbatim() -> None:
    ns = vmm_run("-kernel k -fw_cfg name=opt/a,file=/tmp/a -fw_cfg opt/b,string=x,,y")
    assert ns.fw_cfg == ["name=opt/a,file=/tmp/a", "opt/b,string=x,,y"]


@pytest.mark.parametrize(
    ("option", "serial"),
    [("stdio", "stdio"), ("none", "none"), ("file:/tmp/con.log", "/tmp/con.log"), ("file:none", "./none")],
)
def test_serial_targets(option: str, serial: str) -> None:
    assert vmm_run(f"-kernel k -serial {option}").serial == serial


def test_paths_and_values_that_look_like_options() -> None:
    ns = vmm_run("-kernel -weird.elf -append --verbose -initrd '-mod -x'")
    assert (ns.image, ns.append, ns.module) == ("-weird.elf", "--verbose", [("-mod", "-mod -x")])


# ---- -initrd as hw/i386/multiboot.c splits it --------------------------------------------------------


@pytest.mark.parametrize(
    ("initrd", "modules"),
    [
        ("env", [("env", "env")]),
        ("a.bin arg1 arg2,b.bin", [("a.bin", "a.bin arg1 arg2"), ("b.bin", "b.bin")]),
        ("a,,b", [("a,b", "a,b")]),  # ,, is a literal comma
        ("a x,,y,b", [("a", "a x,y"), ("b", "b")]),
        ("a,,,b", [("a,", "a,"), ("b", "b")]),  # an escaped comma, then the separator
        ("a,b,", [("a", "a"), ("b", "b")]),  # a trailing comma ends the list
        ("a  two  spaces", [("a", "a  two  spaces")]),  # the string is the whole text, as given
        ("", []),
    ],
)
def test_initrd_modules(initrd: str, modules: list[tuple[str, str]]) -> None:
    assert vmm_run(f"-kernel k -initrd {shlex.quote(initrd)}").module == modules


@given(
    st.lists(
        st.tuples(
            # A path may not start with a comma: after a text ending in one, QEMU's escaping
            # (",," is a comma) cannot tell "a," + ",b" from "a,," + "b" either.
            st.text(st.characters(blacklist_characters=" =\0", blacklist_categories=("Cs",)), min_size=1).filter(
                lambda path: not path.startswith(",")
            ),
            st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_initrd_round_trip(mods: list[tuple[str, str]]) -> None:
    texts = [path + (" " + args if args else "") for path, args in mods]
    initrd = ",".join(text.replace(",", ",,") for text in texts)
    t = translate(["-kernel", "k", "-initrd", initrd])
    assert [arg for arg in t.run_args if arg.startswith("--module=")] == [
        f"--module={text.split(' ', 1)[0]}={text}" for text in texts
    ]


@pytest.mark.parametrize(
    ("initrd", "fragment"), [(",a", "module 1 has no file name"), ("a, b", "module 2"), ("x=y", "-initrd x=y")]
)
def test_initrd_refusals(initrd: str, fragment: str) -> None:
    assert fragment in refusal(f"-kernel k -initrd {shlex.quote(initrd)}")


# ---- refusals: one line naming the option ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "named"),
    [
        ("-bios bios.bin", "-bios"),
        ("-drive file=disk.img", "-drive"),
        ("-hda disk.img", "-hda"),
        ("-netdev user,id=n0", "-netdev"),
        ("-monitor stdio", "-monitor"),
        ("-chardev file,id=testlog,path=msr.out", "-chardev"),
        ("--cdrom x.iso", "--cdrom"),
        ("-m=64", "-m=64"),  # QEMU has no -opt=value form either
        ("-serial file:", "-serial file:"),
        ("-serial none -serial stdio", "-serial stdio"),
        ("-serial mon:stdio", "-serial mon:stdio"),
        ("-serial stdio -serial stdio", "-serial stdio"),
        ("-display gtk", "-display gtk"),
        ("-vnc :0", "-vnc :0"),
        ("-vga std", "-vga std"),
        ("-cpu qemu64", "-cpu qemu64"),
        ("-cpu host,+x2apic", "-cpu host,+x2apic"),
        ("-machine isapc", "-machine isapc"),
        ("-machine pc,pit=off", "-machine pit=off"),
        ("-machine kernel_irqchip=split", "-machine kernel-irqchip=split"),
        ("-accel kvm,kernel-irqchip=split", "-accel kvm,kernel-irqchip=split"),
        ("-accel hvf", "-accel hvf"),
        ("-machine accel=xen", "-machine accel=xen"),
        ("-accel kvm,kernel_irqchip=off", "-accel kvm,kernel_irqchip=off"),  # QOM names are not dashified
        ("-accel kvm,dirty-ring-size=65536", "-accel kvm,dirty-ring-size=65536"),
        ("-device edu", "-device edu"),
        ("-device testdev,chardev=testlog", "-device testdev"),
        ("-device isa-debug-exit", "-device isa-debug-exit"),  # QEMU's default iobase is 0x501
        ("-device isa-debug-exit,iobase=0x501,iosize=2", "-device isa-debug-exit,iobase=0x501,iosize=2"),
        ("-device isa-debug-exit,iobase=0xf4,iosize=3", "-device isa-debug-exit,iobase=0xf4,iosize=3"),
        ("-device isa-debug-exit,iobase=0xf4,bus=isa.0", "-device isa-debug-exit,bus=..."),
        ("-global kvm-pit.lost_tick_policy=slew", "-global kvm-pit.lost_tick_policy=slew"),
        ("-m 1G,slots=2,maxmem=4G", "-m maxmem=4G"),
        ("-append --", "-append --"),
        ("-fw_cfg --", "-fw_cfg --"),
    ],
)
def test_refusals_name_the_option(cmdline: str, named: str) -> None:
    message = refusal(f"-kernel k {cmdline}")
    assert message.startswith(f"qemu option {named} is not supported by vmm"), message


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["-m", "64"], "qemu option -kernel is required"),
        ([], "qemu option -kernel is required"),
        (["-kernel"], "qemu option -kernel requires an argument"),
        (["-kernel", "k", "-smp"], "qemu option -smp requires an argument"),
        (["-kernel", "k", "disk.img"], "disk image argument disk.img"),
        (["-kernel", "k", "-m", "1.5"], "qemu option -m 1.5"),  # a fraction of a byte, as QEMU refuses
        (["-kernel", "k", "-m", "lots"], "qemu option -m lots"),
        (["-kernel", "k", "-m", "size="], "qemu option -m size="),
        (["-kernel", "k", "-accel", "kvm", "-enable-kvm"], "incompatible"),
        (["-kernel", "k", "-accel", "kvm", "-machine", "accel=tcg"], "incompatible"),
        (["-kernel", "k", "-append", "x\ny", "-bios", "b"], "qemu option -bios"),
    ],
)
def test_other_errors_are_one_line(argv: list[str], fragment: str) -> None:
    with pytest.raises(InputError) as info:
        translate(argv)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unprintable_values_are_shown_quoted() -> None:
    with pytest.raises(InputError) as info:
        translate(["-kernel", "k", "-device", "a\nb"])
    assert str(info.value) == "qemu option '-device a\\nb' is not supported by vmm"
