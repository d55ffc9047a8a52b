// The restore stub: the smallest program a migration image can be rebuilt in. restore() execs it
// under PTRACE_TRACEME and drives it entirely by syscall injection (ptrace_task.h) at its one
// `syscall` instruction; `scratch` is where injected calls find their arguments (paths, the
// seccomp program, struct prctl_mm_map). Run alone, it just exits with status 127.
// Linked at 0x3f0000000000 (libmigrate/meson.build), an address no ordinary program uses.

        .text
        .globl _start
_start:
        mov     $231, %eax              // exit_group(127) unless a tracer moves rip elsewhere
        mov     $127, %edi
        .globl mos_stub_syscall
mos_stub_syscall:
        syscall
        hlt

        .bss
        .balign 4096
        .globl mos_stub_scratch
mos_stub_scratch:
        .space  131072

        .section .note.GNU-stack, "", @progbits
