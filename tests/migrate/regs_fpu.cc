// General registers, the FPU control state and the AVX registers survive a checkpoint taken
// while the process spins in a loop that holds them: ymm0..ymm15 and rbx, r12..r15 are loaded
// with patterns, the loop waits for a flag that a SIGALRM handler (an interval timer) sets once
// DIR/go exists, then everything is stored and compared. The handler runs many times on both
// sides of the checkpoint, so the kernel's own save and restore of the xsave state is exercised
// too.
#include <fenv.h>
#include <signal.h>
#include <sys/time.h>

#include <cstdint>

#include "zdtm.h"

static volatile int go = 0;
static std::string goPath;

static void onAlarm(int) {
  if (access(goPath.c_str(), F_OK) == 0) {
    go = 1;
  }
}

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  goPath = zdtm::path("go");
  if (!__builtin_cpu_supports("avx")) {
    printf("no AVX: skipped\n");
    return 77;
  }
  alignas(32) uint8_t pattern[16 * 32];
  alignas(32) uint8_t out[16 * 32] = {};
  for (size_t i = 0; i < sizeof(pattern); ++i) {
    pattern[i] = static_cast<uint8_t>(i * 7 + 3);
  }
  uint64_t gpr[5] = {};
  CHECK(fesetround(FE_TOWARDZERO) == 0);
  struct sigaction sa {};
  sa.sa_handler = onAlarm;
  sa.sa_flags = SA_RESTART;
  sigaction(SIGALRM, &sa, nullptr);
  itimerval tv{{0, 2000}, {0, 2000}};
  setitimer(ITIMER_REAL, &tv, nullptr);
  zdtm::ready();
  asm volatile(
      "vmovdqu 0(%[p]), %%ymm0\n vmovdqu 32(%[p]), %%ymm1\n vmovdqu 64(%[p]), %%ymm2\n"
      "vmovdqu 96(%[p]), %%ymm3\n vmovdqu 128(%[p]), %%ymm4\n vmovdqu 160(%[p]), %%ymm5\n"
      "vmovdqu 192(%[p]), %%ymm6\n vmovdqu 224(%[p]), %%ymm7\n vmovdqu 256(%[p]), %%ymm8\n"
      "vmovdqu 288(%[p]), %%ymm9\n vmovdqu 320(%[p]), %%ymm10\n vmovdqu 352(%[p]), %%ymm11\n"
      "vmovdqu 384(%[p]), %%ymm12\n vmovdqu 416(%[p]), %%ymm13\n vmovdqu 448(%[p]), %%ymm14\n"
      "vmovdqu 480(%[p]), %%ymm15\n"
      "movabs $0x1111222233334444, %%rbx\n movabs $0x5555666677778888, %%r12\n"
      "movabs $0x99990000aaaabbbb, %%r13\n movabs $0xccccddddeeeeffff, %%r14\n"
      "movabs $0x0123456789abcdef, %%r15\n"
      "1: pause\n cmpl $0, %[go]\n je 1b\n"
      "vmovdqu %%ymm0, 0(%[o])\n vmovdqu %%ymm1, 32(%[o])\n vmovdqu %%ymm2, 64(%[o])\n"
      "vmovdqu %%ymm3, 96(%[o])\n vmovdqu %%ymm4, 128(%[o])\n vmovdqu %%ymm5, 160(%[o])\n"
      "vmovdqu %%ymm6, 192(%[o])\n vmovdqu %%ymm7, 224(%[o])\n vmovdqu %%ymm8, 256(%[o])\n"
      "vmovdqu %%ymm9, 288(%[o])\n vmovdqu %%ymm10, 320(%[o])\n vmovdqu %%ymm11, 352(%[o])\n"
      "vmovdqu %%ymm12, 384(%[o])\n vmovdqu %%ymm13, 416(%[o])\n vmovdqu %%ymm14, 448(%[o])\n"
      "vmovdqu %%ymm15, 480(%[o])\n"
      "mov %%rbx, 0(%[g])\n mov %%r12, 8(%[g])\n mov %%r13, 16(%[g])\n mov %%r14, 24(%[g])\n"
      "mov %%r15, 32(%[g])\n vzeroupper\n"
      :
      : [p] "r"(pattern), [o] "r"(out), [g] "r"(gpr), [go] "m"(go)
      : "rbx", "r12", "r13", "r14", "r15", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
        "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory",
        "cc");
  itimerval off{};
  setitimer(ITIMER_REAL, &off, nullptr);
  CHECK(memcmp(pattern, out, sizeof(out)) == 0);
  for (int i = 0; i < 16; ++i) {
    if (memcmp(pattern + 32 * i, out + 32 * i, 32) != 0) {
      printf("ymm%d differs\n", i);
    }
  }
  CHECK_EQ(gpr[0], 0x1111222233334444ull);
  CHECK_EQ(gpr[1], 0x5555666677778888ull);
  CHECK_EQ(gpr[2], 0x99990000aaaabbbbull);
  CHECK_EQ(gpr[3], 0xccccddddeeeeffffull);
  CHECK_EQ(gpr[4], 0x0123456789abcdefull);
  CHECK_EQ(fegetround(), FE_TOWARDZERO);
  return zdtm::finish();
}
