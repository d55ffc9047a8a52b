// The AVX-512 state survives a checkpoint: zmm16..zmm31 (only reachable with AVX-512), the
// upper halves of zmm0..zmm15 and the mask registers k1..k7 are loaded with patterns and held in
// a spin loop, as regs_fpu does with ymm. Skipped (77) on a CPU without AVX-512F.
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

// Loads the registers, spins until `go`, stores them. Compiled for AVX-512 (the clobber list
// names its registers); called only once the CPU is known to have it.
__attribute__((target("avx512f"), noinline)) static void hold(const uint8_t* pattern, uint8_t* out,
                                                              uint64_t* masks) {
#define LOAD(n) "vmovdqu64 " #n "*64(%[p]), %%zmm" #n "\n"
#define STORE(n) "vmovdqu64 %%zmm" #n ", " #n "*64(%[o])\n"
  asm volatile(
      LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5) LOAD(6) LOAD(7) LOAD(8) LOAD(9) LOAD(10)
      LOAD(11) LOAD(12) LOAD(13) LOAD(14) LOAD(15) LOAD(16) LOAD(17) LOAD(18) LOAD(19) LOAD(20)
      LOAD(21) LOAD(22) LOAD(23) LOAD(24) LOAD(25) LOAD(26) LOAD(27) LOAD(28) LOAD(29) LOAD(30)
      LOAD(31)
      "movl $0x1111, %%eax\n kmovw %%eax, %%k1\n movl $0x2222, %%eax\n kmovw %%eax, %%k2\n"
      "movl $0x3333, %%eax\n kmovw %%eax, %%k3\n movl $0x4444, %%eax\n kmovw %%eax, %%k4\n"
      "movl $0x5555, %%eax\n kmovw %%eax, %%k5\n movl $0x6666, %%eax\n kmovw %%eax, %%k6\n"
      "movl $0x7777, %%eax\n kmovw %%eax, %%k7\n"
      "1: pause\n cmpl $0, %[go]\n je 1b\n"
      STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6) STORE(7) STORE(8) STORE(9)
      STORE(10) STORE(11) STORE(12) STORE(13) STORE(14) STORE(15) STORE(16) STORE(17) STORE(18)
      STORE(19) STORE(20) STORE(21) STORE(22) STORE(23) STORE(24) STORE(25) STORE(26) STORE(27)
      STORE(28) STORE(29) STORE(30) STORE(31)
      "kmovw %%k1, %%eax\n mov %%rax, 0(%[m])\n kmovw %%k2, %%eax\n mov %%rax, 8(%[m])\n"
      "kmovw %%k3, %%eax\n mov %%rax, 16(%[m])\n kmovw %%k4, %%eax\n mov %%rax, 24(%[m])\n"
      "kmovw %%k5, %%eax\n mov %%rax, 32(%[m])\n kmovw %%k6, %%eax\n mov %%rax, 40(%[m])\n"
      "kmovw %%k7, %%eax\n mov %%rax, 48(%[m])\n vzeroupper\n"
      :
      : [p] "r"(pattern), [o] "r"(out), [m] "r"(masks), [go] "m"(go)
      : "rax", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19",
        "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29",
        "xmm30", "xmm31", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "memory", "cc");
}

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  goPath = zdtm::path("go");
  if (!__builtin_cpu_supports("avx512f")) {
    printf("no AVX-512F: skipped\n");
    return 77;
  }
  alignas(64) uint8_t pattern[32 * 64];
  alignas(64) uint8_t out[32 * 64] = {};
  for (size_t i = 0; i < sizeof(pattern); ++i) {
    pattern[i] = static_cast<uint8_t>(i * 13 + 5);
  }
  uint64_t masks[7] = {};
  struct sigaction sa {};
  sa.sa_handler = onAlarm;
  sa.sa_flags = SA_RESTART;
  sigaction(SIGALRM, &sa, nullptr);
  itimerval tv{{0, 2000}, {0, 2000}};
  setitimer(ITIMER_REAL, &tv, nullptr);
  zdtm::ready();
  hold(pattern, out, masks);
  itimerval off{};
  setitimer(ITIMER_REAL, &off, nullptr);
  for (int i = 0; i < 32; ++i) {
    if (memcmp(pattern + 64 * i, out + 64 * i, 64) != 0) {
      printf("zmm%d differs\n", i);
      ++zdtm::failures;
    }
  }
  for (int i = 0; i < 7; ++i) {
    CHECK_EQ(masks[i], 0x1111ull * (i + 1));
  }
  return zdtm::finish();
}
