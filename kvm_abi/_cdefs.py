"""C declarations of the KVM userspace ABI (x86-64), one string per area.

Each string is both a cffi ``cdef`` and valid C: the compiled fast path
(``_build.py``) pastes the same text into its C source, so ABI mode and API
mode see byte-identical layouts, and the system's ``linux/kvm.h`` (which may
be older than the kernel) is never needed. Layouts follow Linux 6.12/7.2 UAPI
headers; tests pin every size and offset against kvm-abi.md and, where the
system header has the struct, against the C compiler.

This file is the compiled module's whole input (declarations and C source, the
functions in ``FAST_PATH``); the module embeds ``digest()`` of it, so a build
older than any line here is refused (``_ffi.is_current``).
"""

REGS = """
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t  type;
    uint8_t  present, dpl, db, s, l, g, avl;
    uint8_t  unusable;
    uint8_t  padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t  fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t  ftwx;
    uint8_t  pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t  xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax, ebx, ecx, edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_guest_debug_arch {
    uint64_t debugreg[8];
};

struct kvm_guest_debug {
    uint32_t control;
    uint32_t pad;
    struct kvm_guest_debug_arch arch;
};

struct kvm_debug_exit_arch {
    uint32_t exception;
    uint32_t pad;
    uint64_t pc;
    uint64_t dr6;
    uint64_t dr7;
};

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t  valid;
    uint8_t  writeable;
    uint8_t  usermode;
    uint8_t  pad[5];
};
"""

MEMORY = """
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_userspace_memory_region2 {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t guest_memfd_offset;
    uint32_t guest_memfd;
    uint32_t pad1;
    uint64_t pad2[14];
};

struct kvm_create_guest_memfd {
    uint64_t size;
    uint64_t flags;
    uint64_t reserved[6];
};

struct kvm_memory_attributes {
    uint64_t address;
    uint64_t size;
    uint64_t attributes;
    uint64_t flags;
};

/* Mainline (Linux >= 6.11): a vCPU ioctl, updated in place like read(). */
struct kvm_pre_fault_memory {
    uint64_t gpa;
    uint64_t size;
    uint64_t flags;
    uint64_t padding[5];
};

/* The RFC ABI (KVM_MAP_MEMORY, March 2024, never merged): pages, not bytes,
   protection flags, and an optional page of initial contents per page. */
struct kvm_memory_mapping {
    uint64_t base_gfn;
    uint64_t nr_pages;
    uint64_t flags;
    uint64_t source;
};

struct kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    uint64_t dirty_bitmap;  /* union { void *dirty_bitmap; __u64 padding2; } */
};
"""

VM = """
struct kvm_pit_config {
    uint32_t flags;
    uint32_t pad[15];
};

struct kvm_irq_level {
    uint32_t irq;  /* union { __u32 irq; __s32 status; } */
    uint32_t level;
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t  pad[64];
};

/* KVM_(UN)REGISTER_COALESCED_MMIO's zone; pio = 1 (KVM_CAP_COALESCED_PIO) makes it ports. */
struct kvm_coalesced_mmio_zone {
    uint64_t addr;
    uint32_t size;
    uint32_t pio;  /* union { __u32 pad; __u32 pio; } */
};

/* One deferred write in the ring at page KVM_COALESCED_MMIO_PAGE_OFFSET of a vCPU's
 * mapping (one ring per VM): the kernel fills [first, last), userspace advances first. */
struct kvm_coalesced_mmio {
    uint64_t phys_addr;
    uint32_t len;
    uint32_t pio;  /* union { __u32 pad; __u32 pio; } */
    uint8_t  data[8];
};

struct kvm_coalesced_mmio_ring {
    uint32_t first, last;
    struct kvm_coalesced_mmio coalesced_mmio[];
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    uint32_t devid;
    uint8_t  pad[12];
};
"""

RUN = """
struct kvm_run {
    uint8_t  request_interrupt_window;
    uint8_t  immediate_exit;
    uint8_t  padding1[6];
    uint32_t exit_reason;
    uint8_t  ready_for_interrupt_injection;
    uint8_t  if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct {
            uint8_t  direction;
            uint8_t  size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct {
            uint64_t phys_addr;
            uint8_t  data[8];
            uint32_t len;
            uint8_t  is_write;
        } mmio;
        struct {
            uint64_t nr;
            uint64_t args[6];
            uint64_t ret;
            uint64_t flags;  /* union { __u32 longmode; __u64 flags; } in the header */
        } hypercall;
        struct { uint64_t rip; uint32_t is_write; uint32_t pad; } tpr_access;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t flags;
            uint8_t  insn_size;
            uint8_t  insn_bytes[15];
        } emulation_failure;
        struct {
            uint32_t type;
            uint32_t ndata;
            uint64_t data[16];  /* union { __u64 flags; __u64 data[16]; }: flags is data[0] */
        } system_event;
        struct { uint8_t vector; } eoi;
        struct {
            uint8_t  error;
            uint8_t  pad[7];
            uint32_t reason;
            uint32_t index;
            uint64_t data;
        } msr;
        struct { uint32_t flags; } notify;
        struct { uint64_t flags; uint64_t gpa; uint64_t size; } memory_fault;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        char padding[2048];
    } s;
};
"""

TYPES = REGS + MEMORY + VM + RUN

# libc entry points the VMM needs beyond Python's os/mmap modules. ``ioctl`` is
# variadic, so in ABI mode every argument after the request must be cdata.
LIBC = """
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int madvise(void *addr, size_t length, int advice);
int mincore(void *addr, size_t length, unsigned char *vec);
int fallocate(int fd, int mode, long offset, long len);
"""

LIBC_ABI = (
    LIBC
    + """
int ioctl(int fd, unsigned long request, ...);
"""
)

# The compiled module exposes non-variadic wrappers (cheaper to call, and they
# take Python ints) plus a C no-op signal handler used to kick vCPUs out of
# KVM_RUN; a handler written in Python could not run on a vCPU thread.
LIBC_API = (
    LIBC
    + """
int vmm_ioctl_ptr(int fd, unsigned long request, void *arg);
int vmm_ioctl_int(int fd, unsigned long request, unsigned long arg);
int vmm_install_kick_handler(int signo);
void vmm_fast_path_init(unsigned long run_request, uint32_t exit_io, uint64_t pio_data_offset,
                        int64_t fast_io, unsigned int direction_shift, unsigned int size_shift);
int64_t vmm_run_vcpu(int fd, struct kvm_run *run);
const char *vmm_source_digest(void);
"""
)

# What cffi is given to declare (ABI mode parses TYPES + LIBC_ABI instead).
API_CDEF = TYPES + LIBC_API

# The C functions of the compiled module. They hard-code no number of the kernel's ABI:
# vmm_run_vcpu's constants (KVM_RUN, KVM_EXIT_IO, the PIO data offset, the result's layout)
# are handed over once by kvm_abi/__init__.py from the Python tables, so each of them is
# written in one place and editing a table never needs a rebuild.
FAST_PATH = r"""
static int vmm_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg);
}

static int vmm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    return ioctl(fd, request, arg);
}

/* Set by vmm_fast_path_init() when kvm_abi is imported, before run_vcpu is handed out. */
static unsigned long vmm_run_request;   /* KVM_RUN */
static uint32_t vmm_exit_io;            /* KVM_EXIT_IO */
static uint64_t vmm_pio_data_offset;    /* KVM_PIO_PAGE_OFFSET * PAGE_SIZE */
static int64_t vmm_fast_io;             /* kvm_abi.FAST_IO */
static unsigned int vmm_direction_shift, vmm_size_shift;

static void vmm_fast_path_init(unsigned long run_request, uint32_t exit_io, uint64_t pio_data_offset,
                               int64_t fast_io, unsigned int direction_shift, unsigned int size_shift)
{
    vmm_run_request = run_request;
    vmm_exit_io = exit_io;
    vmm_pio_data_offset = pio_data_offset;
    vmm_fast_io = fast_io;
    vmm_direction_shift = direction_shift;
    vmm_size_shift = size_shift;
}

/* KVM_RUN for the hot path (kvm_abi.run_vcpu; its ABI-mode twin is _run_vcpu_abi there):
   -errno on failure; for an exit that is one port access with its data in the PIO page,
   FAST_IO | direction << DIRECTION_SHIFT | size << SIZE_SHIFT | port, one integer the
   caller can use as a dict key; else the exit reason. */
static int64_t vmm_run_vcpu(int fd, struct kvm_run *run)
{
    if (ioctl(fd, vmm_run_request, 0UL) < 0)
        return -errno;
    if (run->exit_reason == vmm_exit_io && run->io.count == 1 && run->io.data_offset == vmm_pio_data_offset)
        return vmm_fast_io | ((int64_t)run->io.direction << vmm_direction_shift)
               | ((int64_t)run->io.size << vmm_size_shift) | run->io.port;
    return run->exit_reason;
}

static const char *vmm_source_digest(void)
{
    return VMM_SOURCE_DIGEST;
}

static void vmm_kick_noop(int signo)
{
    (void)signo;  /* only there so that the signal interrupts KVM_RUN */
}

static int vmm_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = vmm_kick_noop;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  /* no SA_RESTART: KVM_RUN must return EINTR */
    return sigaction(signo, &sa, NULL);
}
"""

HEADERS = r"""
#include <stdint.h>
#include <stddef.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <unistd.h>
"""

C_SOURCE = HEADERS + TYPES + FAST_PATH
"""Everything the C compiler sees but the digest's own ``#define``."""


def _sha256(data: bytes) -> str:
    # CPython's built-in SHA-256 (``_sha256``; ``_sha2`` from 3.12) gives hashlib's digest
    # without loading OpenSSL, which costs a few ms on every start of ``vmm run``.
    try:
        from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ImportError:
            from hashlib import sha256  # type: ignore[assignment,unused-ignore]
    return str(sha256(data).hexdigest())


def source_digest(cdef: str, source: str) -> str:
    """The digest of one build's inputs: the declarations cffi is given and the whole C
    source. Any edit to either (a struct, a prototype, a line of ``vmm_run_vcpu``, a
    comment) gives another digest."""
    return _sha256(cdef.encode() + b"\0" + source.encode())[:16]


_DIGEST: list[str] = []


def digest() -> str:
    """The digest of the current sources. The compiled module embeds the one it was built
    from (``vmm_source_digest()``), so ``_ffi`` refuses a build older than the sources."""
    if not _DIGEST:
        _DIGEST.append(source_digest(API_CDEF, C_SOURCE))
    return _DIGEST[0]


def api_source() -> str:
    """The C source handed to cffi's ``set_source`` (``_build.py``): the sources with their
    digest defined."""
    return f'#define VMM_SOURCE_DIGEST "{digest()}"\n' + C_SOURCE
