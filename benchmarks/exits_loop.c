/*
 * exits_loop: the smallest useful KVM exit loop in C, the baseline for
 * benchmarks/exits.py. Not committed as a binary: exits.py compiles it with gcc into a
 * temporary directory on every run.
 *
 *   exits_loop N HEXCODE [REPEATS]
 *
 * Creates a VM without an irqchip (so HLT exits to userspace), one 64 KiB RAM slot at
 * guest-physical 0, one vCPU in 16-bit real mode with CS base 0, and copies the guest
 * code (given as hex) to 0x1000. The guest gets N in ECX and does N port-IO or MMIO
 * accesses then HLT. Each IO/MMIO exit is handled minimally, as a device would: an
 * OUT/MMIO write has its data read, an IN/MMIO read has data filled in. The run from the
 * first KVM_RUN until the HLT exit is timed with clock_gettime: CLOCK_MONOTONIC (wall)
 * and CLOCK_THREAD_CPUTIME_ID (this thread's CPU time, user + kernel, which time spent
 * preempted by other processes does not inflate). After one untimed warm-up run of
 * min(N, 1000) iterations, this is repeated REPEATS times (default 1) on the same vCPU,
 * resetting RIP and RCX, and each timed run prints one line:
 *
 *   exits <io+mmio exits> ns <wall ns> cpu_ns <cpu ns> ns_per_exit <wall ns per exit>
 *
 * Exit status 0 on success; any unexpected exit prints a message and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define CODE_ADDR 0x1000

static void die(const char *what) {
    fprintf(stderr, "exits_loop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s N HEXCODE [REPEATS]\n", argv[0]);
        return 2;
    }
    unsigned long n = strtoul(argv[1], NULL, 0);
    const char *hex = argv[2];
    int repeats = argc > 3 ? atoi(argv[3]) : 1;
    size_t code_len = strlen(hex) / 2;
    if (strlen(hex) % 2 || code_len == 0 || code_len > MEM_SIZE - CODE_ADDR) {
        fprintf(stderr, "exits_loop: bad HEXCODE\n");
        return 2;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap guest memory");
    for (size_t i = 0; i < code_len; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "exits_loop: bad HEXCODE\n");
            return 2;
        }
        mem[CODE_ADDR + i] = (uint8_t)(hi << 4 | lo);
    }
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0) die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");

    volatile uint64_t sink = 0;   /* where "the device" puts what it reads */
    for (int rep = -1; rep < repeats; rep++) {      /* rep -1: the warm-up */
        struct kvm_regs regs;
        memset(&regs, 0, sizeof(regs));
        regs.rip = CODE_ADDR;
        regs.rflags = 2;
        regs.rcx = rep < 0 && n > 1000 ? 1000 : n;
        if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

        uint64_t exits = 0;
        uint64_t start = now_ns(CLOCK_MONOTONIC);
        uint64_t cpu_start = now_ns(CLOCK_THREAD_CPUTIME_ID);
        for (;;) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0) {
                if (errno == EINTR || errno == EAGAIN) continue;
                die("KVM_RUN");
            }
            switch (run->exit_reason) {
            case KVM_EXIT_IO: {
                uint8_t *data = (uint8_t *)run + run->io.data_offset;
                uint32_t len = run->io.size * run->io.count;
                if (run->io.direction == KVM_EXIT_IO_OUT) {
                    for (uint32_t i = 0; i < len; i++) sink += data[i];
                } else {
                    memset(data, 0xa5, len);
                }
                exits++;
                continue;
            }
            case KVM_EXIT_MMIO:
                if (run->mmio.is_write) {
                    for (uint32_t i = 0; i < run->mmio.len; i++) sink += run->mmio.data[i];
                } else {
                    memset(run->mmio.data, 0xa5, run->mmio.len);
                }
                exits++;
                continue;
            case KVM_EXIT_HLT:
                break;
            default:
                fprintf(stderr, "exits_loop: unexpected exit reason %u\n", run->exit_reason);
                return 1;
            }
            break;
        }
        uint64_t cpu_ns = now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu_start;
        uint64_t ns = now_ns(CLOCK_MONOTONIC) - start;
        if (rep < 0)
            continue;
        printf("exits %llu ns %llu cpu_ns %llu ns_per_exit %.1f\n", (unsigned long long)exits,
               (unsigned long long)ns, (unsigned long long)cpu_ns,
               exits ? (double)ns / (double)exits : 0.0);
        fflush(stdout);
    }
    return 0;
}
