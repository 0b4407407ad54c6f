/* cvmm: the C floor for the exit benchmark (bench/README.md).
 *
 * A deliberately small KVM VMM that boots a 64-bit guest ELF (guests/pio-loop64.elf)
 * exactly as the Python VMM does (guests/README.md, "Memory layout" and "At entry"):
 * 64 MiB of 2 MiB-aligned anonymous RAM with MADV_HUGEPAGE in memslot 0, KVM_SET_TSS_ADDR,
 * the GDT at 0x2000, the TSS with an all-ports I/O bitmap at 0x3000, identity page tables
 * (2 MiB pages, 4 GiB) at 0x10000, the boot info with `count=N` at 0x1000, KVM's supported
 * CPUID, and long mode at ring 0 (default) or ring 3 (--user: CS 0x2b, SS 0x23, IOPL 3).
 *
 * It runs one vCPU and handles exits as vmm/backends/kvm.py does: OUT to 0x80 is a latch,
 * OUT to 0xf4 ends the run with status (v << 1) | 1, 0x3f8-0x3ff is the UART's transmit
 * side (bytes go to stderr), any other port reads all-ones and drops writes, MMIO likewise,
 * HLT ends the run. Anything else is a guest crash.
 *
 * Output (stdout, one JSON object): the exit counts and the seconds of the run loop only
 * (CLOCK_MONOTONIC around the KVM_RUN loop). Process status: 0 when the guest ended through
 * the exit port or HLT, 4 when it crashed, 1 on a VMM or host error, 2 on bad usage.
 *
 * With --irqchip it also creates the in-kernel interrupt controllers and PIT, as the Python
 * VMM's default machine does (KVM_CREATE_IRQCHIP, then KVM_CREATE_PIT2 with the dummy
 * speaker; --no-pit leaves the PIT out). With --lifecycles N it is the floor of the lifecycle
 * benchmark (bench/lifecycle.py): N times open /dev/kvm, build the VM, load and run the
 * guest, check its result and release everything, timing each phase; one JSON object with
 * the lifecycles per second and the mean seconds of each phase.
 *
 * Usage: cvmm [--user] [--irqchip [--no-pit]] [--count N] [--lifecycles N] IMAGE
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* --- the boot contract (vmm/cpu/layout.py, vmm/bootinfo.py) -------------------------- */
#define GiB (1ULL << 30)
#define MiB (1ULL << 20)
#define RAM_SIZE (64 * MiB) /* MachineConfig's default */
#define HUGE_PAGE (2 * MiB)
#define TSS_ADDR_KVM 0xfffbd000UL /* KVM_SET_TSS_ADDR, as vmm/vm.py */

#define BOOT_INFO 0x1000
#define GDT_ADDR 0x2000
#define GDT_LIMIT 0x47
#define TSS_ADDR 0x3000
#define TSS_IOPB_OFFSET 104
#define TSS_LIMIT (104 + 8192)
#define PAGE_TABLES 0x10000
#define STACKS_TOP 0xa0000
#define SYSTEM_END 0xa0000

#define SEL_CODE64 0x08
#define SEL_DATA 0x10
#define SEL_CODE32 0x18
#define SEL_USER_DATA 0x23
#define SEL_USER_CODE64 0x2b
#define SEL_TSS 0x30

#define CR0_PE (1ULL << 0)
#define CR0_MP (1ULL << 1)
#define CR0_ET (1ULL << 4)
#define CR0_NE (1ULL << 5)
#define CR0_WP (1ULL << 16)
#define CR0_PG (1ULL << 31)
#define CR4_PAE (1ULL << 5)
#define CR4_OSFXSR (1ULL << 9)
#define CR4_OSXMMEXCPT (1ULL << 10)
#define EFER_LME (1ULL << 8)
#define EFER_LMA (1ULL << 10)
#define RFLAGS_FIXED 0x2ULL
#define RFLAGS_IOPL3 0x3000ULL
#define PTE_PWU 0x7ULL /* present | write | user */
#define PTE_LARGE 0x80ULL

#define BI_MAGIC 0x424d4d56U
#define BI_VERSION 1
#define BI_ARGS 0x100
#define BI_ARGS_MAX (0x1000 - BI_ARGS)
#define MODE_LONG 2
#define MODE_USER 3

#define PORT_POST 0x80
#define PORT_EXIT 0xf4
#define PORT_COM1 0x3f8
#define COM1_LSR 5
#define LSR_THRE_TEMT 0x60

#define STATUS_CRASHED 4
#if defined(__clang__)
#define COMPILER __VERSION__
#else
#define COMPILER "gcc " __VERSION__
#endif
#define MAX_CPUID 256

/* --- errors --------------------------------------------------------------------------- */
static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Print "cvmm: <message>" to stderr (with strerror(errno) when the format ends in ':'). */
static void fail(const char *fmt, ...)
{
    int saved = errno;
    va_list ap;
    fputs("cvmm: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    size_t n = strlen(fmt);
    if (n && fmt[n - 1] == ':')
        fprintf(stderr, " %s", strerror(saved));
    fputc('\n', stderr);
}

/* --- everything one run owns; released by vm_close() ---------------------------------- */
struct vm {
    int kvm, vm, vcpu;
    uint8_t *ram;
    struct kvm_run *run;
    size_t run_size;
};

static void vm_close(struct vm *v)
{
    if (v->run && munmap(v->run, v->run_size) < 0)
        fail("munmap(kvm_run):");
    if (v->vcpu >= 0 && close(v->vcpu) < 0)
        fail("close(vcpu):");
    if (v->vm >= 0 && close(v->vm) < 0)
        fail("close(vm):");
    if (v->ram && munmap(v->ram, RAM_SIZE) < 0)
        fail("munmap(ram):");
    if (v->kvm >= 0 && close(v->kvm) < 0)
        fail("close(/dev/kvm):");
}

/* An ioctl that must succeed; -1 after printing which one failed. */
static int xioctl(int fd, unsigned long request, unsigned long arg, const char *name)
{
    int rc;
    do
        rc = ioctl(fd, request, arg);
    while (rc < 0 && errno == EINTR);
    if (rc < 0)
        fail("%s:", name);
    return rc;
}
#define IOCTL(fd, req, arg) xioctl((fd), (req), (unsigned long)(arg), #req)

/* --- guest memory ----------------------------------------------------------------------- */
/* 64 MiB anonymous, 2 MiB aligned (over-map and trim), MADV_HUGEPAGE: vmm.memory's "thp". */
static uint8_t *alloc_ram(void)
{
    size_t span = RAM_SIZE + HUGE_PAGE;
    uint8_t *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) {
        fail("mmap(guest RAM):");
        return NULL;
    }
    uintptr_t addr = ((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    size_t head = addr - (uintptr_t)raw, tail = span - head - RAM_SIZE;
    if ((head && munmap(raw, head) < 0) || (tail && munmap((uint8_t *)addr + RAM_SIZE, tail) < 0)) {
        fail("munmap(guest RAM slack):");
        return NULL; /* the rest of the span stays mapped: we exit right away */
    }
    /* THP may be disabled ("never"): still correct with 4 KiB pages, as in vmm.memory. */
    (void)madvise((void *)addr, RAM_SIZE, MADV_HUGEPAGE);
    return (uint8_t *)addr;
}

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* --- segments (vmm/cpu/state.py) ------------------------------------------------------- */
static struct kvm_segment flat(uint16_t selector, bool code, uint8_t dpl, bool is_long)
{
    return (struct kvm_segment){
        .base = 0, .limit = 0xffffffff, .selector = selector, .type = code ? 0xb : 0x3,
        .present = 1, .dpl = dpl, .db = is_long ? 0 : 1, .s = 1, .l = is_long ? 1 : 0, .g = 1,
    };
}

static const struct kvm_segment TSS_SEG = {
    .base = TSS_ADDR, .limit = TSS_LIMIT, .selector = SEL_TSS, .type = 0xb, .present = 1, .s = 0,
};
static const struct kvm_segment LDT_NONE = {
    .limit = 0xffff, .type = 0x2, .present = 0, .unusable = 1,
};

/* The 8-byte GDT descriptor of a segment (Segment.descriptor()). */
static uint64_t descriptor(struct kvm_segment s)
{
    uint64_t limit = s.g ? s.limit >> 12 : s.limit;
    uint64_t access = s.type | (uint64_t)s.s << 4 | (uint64_t)s.dpl << 5 | (uint64_t)s.present << 7;
    uint64_t flags = (uint64_t)s.l << 1 | (uint64_t)s.db << 2 | (uint64_t)s.g << 3;
    return (limit & 0xffff) | (s.base & 0xffffff) << 16 | access << 40 | ((limit >> 16) & 0xf) << 48
           | flags << 52 | ((s.base >> 24) & 0xff) << 56;
}

/* GDT, TSS and identity page tables (write_system_tables for long/user mode). */
static void write_system_tables(uint8_t *ram)
{
    const struct kvm_segment gdt[] = {
        {0}, flat(SEL_CODE64, true, 0, true), flat(SEL_DATA, false, 0, false), flat(SEL_CODE32, true, 0, false),
        flat(SEL_USER_DATA, false, 3, false), flat(SEL_USER_CODE64, true, 3, true),
    };
    size_t n = sizeof gdt / sizeof gdt[0];
    for (size_t i = 1; i < n; i++)
        put64(ram + GDT_ADDR + 8 * i, descriptor(gdt[i]));
    struct kvm_segment tss_desc = TSS_SEG;
    tss_desc.type = 0x9; /* available 64-bit TSS in the GDT; KVM's TR says busy (0xb) */
    put64(ram + GDT_ADDR + 8 * n, descriptor(tss_desc));
    put64(ram + GDT_ADDR + 8 * n + 8, TSS_SEG.base >> 32);

    uint8_t *tss = ram + TSS_ADDR;
    put64(tss + 4, STACKS_TOP); /* RSP0 */
    put16(tss + 102, TSS_IOPB_OFFSET);
    tss[TSS_LIMIT] = 0xff; /* the bitmap (all zero: every port allowed), then 0xff */

    const unsigned gibs = 4; /* mapped_size(): max(4 GiB, RAM) */
    uint64_t pml4 = PAGE_TABLES, pdpt = PAGE_TABLES + 0x1000;
    put64(ram + pml4, pdpt | PTE_PWU);
    for (unsigned i = 0; i < gibs; i++) {
        uint64_t pd = PAGE_TABLES + 0x2000 + 0x1000ULL * i;
        put64(ram + pdpt + 8 * i, pd | PTE_PWU);
        for (unsigned j = 0; j < 512; j++)
            put64(ram + pd + 8 * j, (i * GiB + j * HUGE_PAGE) | PTE_PWU | PTE_LARGE);
    }
}

/* --- the ELF64 loader ------------------------------------------------------------------ */
struct image {
    uint64_t entry, start, end;
};

/* Load every PT_LOAD segment of the ELF64 x86-64 executable at `path` to its p_paddr.
 * Returns 0, or -1 after saying why. */
static int load_elf(const char *path, uint8_t *ram, struct image *img)
{
    int rc = -1;
    uint8_t *data = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fail("%s:", path);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        fail("fstat(%s):", path);
        goto out;
    }
    size_t size = (size_t)st.st_size;
    if (size < sizeof(Elf64_Ehdr)) {
        fail("%s: too short for an ELF64 header", path);
        goto out;
    }
    data = malloc(size);
    if (!data) {
        fail("malloc(%zu):", size);
        goto out;
    }
    for (size_t got = 0; got < size;) {
        ssize_t r = read(fd, data + got, size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EIO;
            fail("read(%s):", path);
            goto out;
        }
        got += (size_t)r;
    }
    Elf64_Ehdr eh;
    memcpy(&eh, data, sizeof eh);
    if (memcmp(eh.e_ident, ELFMAG, SELFMAG) || eh.e_ident[EI_CLASS] != ELFCLASS64
        || eh.e_ident[EI_DATA] != ELFDATA2LSB || eh.e_machine != EM_X86_64 || eh.e_type != ET_EXEC) {
        fail("%s: not an ELF64 x86-64 executable", path);
        goto out;
    }
    if (eh.e_phentsize != sizeof(Elf64_Phdr) || eh.e_phoff > size
        || (size - eh.e_phoff) / sizeof(Elf64_Phdr) < eh.e_phnum) {
        fail("%s: program headers run past the end of the file", path);
        goto out;
    }
    img->entry = eh.e_entry;
    img->start = UINT64_MAX;
    img->end = 0;
    for (unsigned i = 0; i < eh.e_phnum; i++) {
        Elf64_Phdr ph;
        memcpy(&ph, data + eh.e_phoff + i * sizeof ph, sizeof ph);
        if (ph.p_type != PT_LOAD || ph.p_memsz == 0)
            continue;
        if (ph.p_filesz > ph.p_memsz || ph.p_offset > size || size - ph.p_offset < ph.p_filesz) {
            fail("%s: segment at %#" PRIx64 " runs past the end of the file", path, (uint64_t)ph.p_paddr);
            goto out;
        }
        if (ph.p_paddr < SYSTEM_END || ph.p_paddr > RAM_SIZE || RAM_SIZE - ph.p_paddr < ph.p_memsz) {
            fail("%s: segment %#" PRIx64 "+%#" PRIx64 " is outside [%#x, %#llx)", path, (uint64_t)ph.p_paddr,
                 (uint64_t)ph.p_memsz, SYSTEM_END, (unsigned long long)RAM_SIZE);
            goto out;
        }
        memcpy(ram + ph.p_paddr, data + ph.p_offset, ph.p_filesz);
        memset(ram + ph.p_paddr + ph.p_filesz, 0, ph.p_memsz - ph.p_filesz);
        if (ph.p_paddr < img->start)
            img->start = ph.p_paddr;
        if (ph.p_paddr + ph.p_memsz > img->end)
            img->end = ph.p_paddr + ph.p_memsz;
    }
    if (img->end == 0) {
        fail("%s: no loadable segments", path);
        goto out;
    }
    rc = 0;
out:
    free(data);
    if (close(fd) < 0) {
        fail("close(%s):", path);
        rc = -1;
    }
    return rc;
}

/* The boot info block at 0x1000 (vmm/bootinfo.py), with the single argument count=N. */
static int write_boot_info(uint8_t *ram, const struct image *img, uint32_t mode, uint64_t count)
{
    char args[64];
    int n = snprintf(args, sizeof args, "count=%" PRIu64, count);
    if (n < 0 || (size_t)n + 2 > sizeof args || n + 2 > BI_ARGS_MAX) {
        fail("boot arguments do not fit");
        return -1;
    }
    uint8_t *bi = ram + BOOT_INFO;
    put32(bi + 0, BI_MAGIC);
    put32(bi + 4, BI_VERSION);
    put64(bi + 8, RAM_SIZE);
    put32(bi + 16, 1); /* vCPUs */
    put32(bi + 20, mode);
    put64(bi + 24, img->start);
    put64(bi + 32, img->end);
    put32(bi + 40, 1); /* RAM ranges */
    put32(bi + 44, (uint32_t)n + 2); /* "count=N\0" then the empty string */
    put64(bi + 48, 0);
    put64(bi + 56, RAM_SIZE);
    memcpy(bi + BI_ARGS, args, (size_t)n + 1);
    bi[BI_ARGS + n + 1] = 0;
    return 0;
}

/* --- vCPU setup ------------------------------------------------------------------------- */
/* KVM's supported CPUID with vCPU 0's APIC id (cpuid_for_vcpu in vmm/backends/kvm.py). */
static int set_cpuid(struct vm *v)
{
    size_t bytes = sizeof(struct kvm_cpuid2) + MAX_CPUID * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *cpuid = calloc(1, bytes);
    if (!cpuid) {
        fail("calloc(%zu):", bytes);
        return -1;
    }
    cpuid->nent = MAX_CPUID;
    int rc = IOCTL(v->kvm, KVM_GET_SUPPORTED_CPUID, cpuid);
    if (rc >= 0) {
        for (uint32_t i = 0; i < cpuid->nent; i++) {
            struct kvm_cpuid_entry2 *e = &cpuid->entries[i];
            if (e->function == 1)
                e->ebx &= 0x00ffffff; /* initial APIC id 0 */
            else if (e->function == 0xb || e->function == 0x1f)
                e->edx = 0; /* x2APIC id 0 */
        }
        rc = IOCTL(v->vcpu, KVM_SET_CPUID2, cpuid);
    }
    free(cpuid);
    return rc < 0 ? -1 : 0;
}

/* Long mode at ring 0, or ring 3 with IOPL 3 (boot_state + apply_state). */
static int set_boot_state(struct vm *v, uint64_t entry, bool user)
{
    struct kvm_sregs sregs;
    if (IOCTL(v->vcpu, KVM_GET_SREGS, &sregs) < 0)
        return -1;
    struct kvm_segment code = user ? flat(SEL_USER_CODE64, true, 3, true) : flat(SEL_CODE64, true, 0, true);
    struct kvm_segment data = user ? flat(SEL_USER_DATA, false, 3, false) : flat(SEL_DATA, false, 0, false);
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.tr = TSS_SEG;
    sregs.ldt = LDT_NONE;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = 0;
    sregs.idt.limit = 0xffff;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PAGE_TABLES;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    if (IOCTL(v->vcpu, KVM_SET_SREGS, &sregs) < 0)
        return -1;
    struct kvm_regs regs = {
        .rip = entry, .rsp = STACKS_TOP, .rdi = BOOT_INFO, .rsi = 0,
        .rflags = RFLAGS_FIXED | (user ? RFLAGS_IOPL3 : 0),
    };
    return IOCTL(v->vcpu, KVM_SET_REGS, &regs) < 0 ? -1 : 0;
}

/* The in-kernel PIC, IOAPIC and local APICs, and the PIT (vmm/backends/kvm.py's default). */
static bool want_irqchip, want_pit = true;

/* Open /dev/kvm, create the VM with its RAM and one vCPU, and load the guest. */
static int vm_setup(struct vm *v, const char *image, bool user, uint64_t count)
{
    v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (v->kvm < 0) {
        fail("/dev/kvm:");
        return -1;
    }
    int api = IOCTL(v->kvm, KVM_GET_API_VERSION, 0);
    if (api < 0)
        return -1;
    if (api != KVM_API_VERSION) {
        fail("KVM API version %d, expected %d", api, KVM_API_VERSION);
        return -1;
    }
    v->vm = IOCTL(v->kvm, KVM_CREATE_VM, 0);
    if (v->vm < 0)
        return -1;
    if (IOCTL(v->vm, KVM_SET_TSS_ADDR, TSS_ADDR_KVM) < 0)
        return -1;
    v->ram = alloc_ram();
    if (!v->ram)
        return -1;
    struct kvm_userspace_memory_region slot = {
        .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE, .userspace_addr = (uintptr_t)v->ram,
    };
    if (IOCTL(v->vm, KVM_SET_USER_MEMORY_REGION, &slot) < 0)
        return -1;
    /* After the memslot, as vmm/backends/kvm.py does: created first, the controllers make
     * the memslot wait for an SRCU grace period (bench/README.md). */
    if (want_irqchip) {
        if (IOCTL(v->vm, KVM_CREATE_IRQCHIP, 0) < 0)
            return -1;
        struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
        if (want_pit && IOCTL(v->vm, KVM_CREATE_PIT2, &pit) < 0)
            return -1;
    }

    write_system_tables(v->ram);
    struct image img;
    if (load_elf(image, v->ram, &img) < 0)
        return -1;
    if (write_boot_info(v->ram, &img, user ? MODE_USER : MODE_LONG, count) < 0)
        return -1;

    v->vcpu = IOCTL(v->vm, KVM_CREATE_VCPU, 0);
    if (v->vcpu < 0)
        return -1;
    int size = IOCTL(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size < 0)
        return -1;
    if ((size_t)size < sizeof(struct kvm_run)) {
        fail("KVM_GET_VCPU_MMAP_SIZE = %d, smaller than struct kvm_run", size);
        return -1;
    }
    void *run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    if (run == MAP_FAILED) {
        fail("mmap(kvm_run):");
        return -1;
    }
    v->run = run;
    v->run_size = (size_t)size;
    if (set_cpuid(v) < 0 || set_boot_state(v, img.entry, user) < 0)
        return -1;
    return 0;
}

/* --- the run loop ----------------------------------------------------------------------- */
struct counts {
    uint64_t io, mmio, hlt, interrupted, other;
    uint64_t post_writes, unhandled;
    uint8_t post_latch;
};

struct outcome {
    bool crashed, exited;
    uint64_t exit_value;
    char detail[160];
};

static uint64_t le_value(const uint8_t *p, unsigned size)
{
    uint64_t v = 0;
    for (unsigned i = size; i-- > 0;)
        v = v << 8 | p[i];
    return v;
}

/* One port access of `size` bytes at `p` (string I/O calls this once per element).
 * Returns true when the access ends the run (the exit port). */
static bool pio(struct counts *c, struct outcome *o, uint16_t port, bool out, uint8_t *p, unsigned size)
{
    if (out) {
        if (port == PORT_POST) {
            c->post_latch = p[0];
            c->post_writes++;
        } else if (port == PORT_EXIT) {
            o->exited = true;
            o->exit_value = le_value(p, size);
            return true;
        } else if (port == PORT_COM1) {
            (void)fwrite(p, 1, 1, stderr); /* THR (DLAB is never set by our guests) */
        } else if (port > PORT_COM1 && port < PORT_COM1 + 8) {
            /* the other UART registers: state the loop does not need */
        } else {
            c->unhandled++;
        }
        return false;
    }
    memset(p, 0, size);
    if (port == PORT_POST)
        p[0] = c->post_latch;
    else if (port == PORT_COM1 + COM1_LSR)
        p[0] = LSR_THRE_TEMT;
    else if (port == PORT_EXIT || (port >= PORT_COM1 && port < PORT_COM1 + 8))
        ; /* reads as zero */
    else {
        memset(p, 0xff, size);
        c->unhandled++;
    }
    return false;
}

/* KVM_RUN until the guest exits, halts or crashes; -1 on a host error. */
static int run_loop(struct vm *v, struct counts *c, struct outcome *o)
{
    struct kvm_run *run = v->run;
    uint8_t *page = (uint8_t *)run;
    for (;;) {
        if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                run->immediate_exit = 0;
                c->interrupted++;
                continue;
            }
            fail("KVM_RUN:");
            return -1;
        }
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            c->io++;
            unsigned size = run->io.size;
            uint8_t *p = page + run->io.data_offset;
            bool out = run->io.direction == KVM_EXIT_IO_OUT;
            for (uint32_t i = 0; i < run->io.count; i++, p += size)
                if (pio(c, o, run->io.port, out, p, size))
                    return 0;
            break;
        }
        case KVM_EXIT_MMIO: /* no MMIO devices: reads are all-ones, writes dropped */
            c->mmio++;
            c->unhandled++;
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0xff, run->mmio.len);
            break;
        case KVM_EXIT_HLT:
            c->hlt++;
            return 0;
        case KVM_EXIT_SHUTDOWN:
            c->other++;
            o->crashed = true;
            snprintf(o->detail, sizeof o->detail, "triple fault (shutdown)");
            return 0;
        case KVM_EXIT_INTERNAL_ERROR:
            c->other++;
            o->crashed = true;
            snprintf(o->detail, sizeof o->detail, "KVM internal error, suberror %u", run->internal.suberror);
            return 0;
        case KVM_EXIT_FAIL_ENTRY:
            c->other++;
            o->crashed = true;
            snprintf(o->detail, sizeof o->detail, "entry failed, hardware reason %#llx",
                     (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
            return 0;
        default:
            c->other++;
            o->crashed = true;
            snprintf(o->detail, sizeof o->detail, "unexpected exit reason %u", run->exit_reason);
            return 0;
        }
    }
}

/* --- main -------------------------------------------------------------------------------- */
static int usage(void)
{
    fputs("usage: cvmm [--user] [--irqchip [--no-pit]] [--count N] [--lifecycles N] IMAGE\n"
          "Boots IMAGE (a 64-bit guest ELF, e.g. guests/pio-loop64.elf) on one vCPU at ring 0,\n"
          "or ring 3 with --user, with the boot argument count=N (default 100000); prints one\n"
          "JSON object with the exit counts and the run loop's seconds. --irqchip: the in-kernel\n"
          "interrupt controllers and PIT (--no-pit: without the PIT). --lifecycles N: N whole\n"
          "lifecycles (open, build, load, run, release), timed per phase.\n",
          stderr);
    return 2;
}

static double elapsed(const struct timespec *a, const struct timespec *b)
{
    return (double)(b->tv_sec - a->tv_sec) + (double)(b->tv_nsec - a->tv_nsec) / 1e9;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* cannot fail with a valid clock and pointer */
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* --lifecycles: n times setup, run, check, release. Every run must end through the exit
 * port with value 0 after exactly `count` POST writes; 0, or 1 after saying what went wrong. */
static int lifecycles(const char *image, bool user, uint64_t count, uint64_t n)
{
    double setup = 0, run = 0, teardown = 0, started = now();
    for (uint64_t i = 0; i < n; i++) {
        struct vm v = {.kvm = -1, .vm = -1, .vcpu = -1};
        struct counts c = {0};
        struct outcome o = {0};
        double t0 = now();
        int rc = vm_setup(&v, image, user, count);
        double t1 = now();
        if (rc == 0)
            rc = run_loop(&v, &c, &o);
        double t2 = now();
        vm_close(&v);
        double t3 = now();
        if (rc < 0)
            return 1;
        if (o.crashed || !o.exited || o.exit_value != 0 || c.post_writes != count) {
            fail("lifecycle %" PRIu64 ": the guest did not exit with 0 after %" PRIu64 " POST writes (%s)", i, count,
                 o.crashed ? o.detail : "wrong result");
            return 1;
        }
        setup += t1 - t0;
        run += t2 - t1;
        teardown += t3 - t2;
    }
    double seconds = now() - started;
    printf("{\"vmm\": \"cvmm\", \"lifecycles\": %" PRIu64 ", \"irqchip\": %s, \"pit\": %s, \"count\": %" PRIu64
           ", \"seconds\": %.9f, \"lifecycles_per_s\": %.1f, \"setup_s\": %.9f, \"run_s\": %.9f"
           ", \"teardown_s\": %.9f, \"compiler\": \"%s\"}\n",
           n, want_irqchip ? "true" : "false", want_irqchip && want_pit ? "true" : "false", count, seconds,
           seconds > 0 ? (double)n / seconds : 0.0, setup / (double)n, run / (double)n, teardown / (double)n,
           COMPILER);
    if (fflush(stdout) == EOF || ferror(stdout)) {
        fail("writing the result:");
        return 1;
    }
    return 0;
}

static bool parse_u64(const char *text, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(text, &end, 0);
    if (errno || *end || text[0] == '-' || text[0] == '\0')
        return false;
    *out = n;
    return true;
}

int main(int argc, char **argv)
{
    bool user = false;
    uint64_t count = 100000, n_lifecycles = 0;
    const char *image = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--user")) {
            user = true;
        } else if (!strcmp(argv[i], "--irqchip")) {
            want_irqchip = true;
        } else if (!strcmp(argv[i], "--no-pit")) {
            want_pit = false;
        } else if (!strcmp(argv[i], "--count") && i + 1 < argc) {
            if (!parse_u64(argv[++i], &count)) {
                fprintf(stderr, "cvmm: bad --count %s\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(argv[i], "--lifecycles") && i + 1 < argc) {
            if (!parse_u64(argv[++i], &n_lifecycles) || n_lifecycles == 0) {
                fprintf(stderr, "cvmm: bad --lifecycles %s\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage();
            return 0;
        } else if (argv[i][0] != '-' && !image) {
            image = argv[i];
        } else {
            return usage();
        }
    }
    if (!image)
        return usage();
    if (n_lifecycles)
        return lifecycles(image, user, count, n_lifecycles);

    struct vm v = {.kvm = -1, .vm = -1, .vcpu = -1};
    struct counts c = {0};
    struct outcome o = {0};
    struct timespec t0, t1;
    int status = 1;
    if (vm_setup(&v, image, user, count) < 0)
        goto out;
    if (clock_gettime(CLOCK_MONOTONIC, &t0) < 0) {
        fail("clock_gettime:");
        goto out;
    }
    if (run_loop(&v, &c, &o) < 0)
        goto out;
    if (clock_gettime(CLOCK_MONOTONIC, &t1) < 0) {
        fail("clock_gettime:");
        goto out;
    }
    double seconds = elapsed(&t0, &t1);
    uint64_t exits = c.io + c.mmio + c.hlt + c.other;
    int vmm_status = o.crashed ? STATUS_CRASHED : o.exited ? (int)((o.exit_value << 1 | 1) & 0xff) : 0;
    printf("{\"vmm\": \"cvmm\", \"mode\": \"%s\", \"count\": %" PRIu64 ", \"exits\": %" PRIu64
           ", \"io\": %" PRIu64 ", \"mmio\": %" PRIu64 ", \"hlt\": %" PRIu64 ", \"interrupted\": %" PRIu64
           ", \"other\": %" PRIu64 ", \"post_writes\": %" PRIu64 ", \"unhandled\": %" PRIu64
           ", \"seconds\": %.9f, \"exits_per_s\": %.1f, \"status\": %d",
           user ? "user" : "long", count, exits, c.io, c.mmio, c.hlt, c.interrupted, c.other, c.post_writes,
           c.unhandled, seconds, seconds > 0 ? (double)exits / seconds : 0.0, vmm_status);
    if (o.exited)
        printf(", \"exit_value\": %" PRIu64, o.exit_value);
    else
        printf(", \"exit_value\": null");
    printf(", \"crash\": ");
    if (o.crashed)
        printf("\"%s\"", o.detail); /* fixed texts and numbers: no escaping needed */
    else
        printf("null");
    printf(", \"compiler\": \"%s\"}\n", COMPILER);
    if (fflush(stdout) == EOF || ferror(stdout)) {
        fail("writing the result:");
        goto out;
    }
    status = o.crashed ? STATUS_CRASHED : 0;
    if (o.crashed)
        fprintf(stderr, "cvmm: guest crashed: %s\n", o.detail);
out:
    vm_close(&v);
    return status;
}
