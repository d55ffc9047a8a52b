// deputy_syscall(nr, a1, a2, a3, a4, a5, a6): one raw system call of the job, made with signals
// unblocked. See signals.h for the race this closes (the same one musl's cancellation points
// close, src/thread/x86_64/syscall_cp.s): a signal that arrives after the pending check but
// before the kernel is entered would otherwise be handled first and the call then block forever.
// The signal handler moves an interrupted rip that lies in [deputy_syscall_check,
// deputy_syscall_insn] to deputy_syscall_cancelled, which returns -EINTR without entering the
// kernel.

	.text
	.globl deputy_syscall
	.hidden deputy_syscall
	.type deputy_syscall, @function
	.globl deputy_syscall_check
	.hidden deputy_syscall_check
	.globl deputy_syscall_insn
	.hidden deputy_syscall_insn
	.globl deputy_syscall_cancelled
	.hidden deputy_syscall_cancelled
deputy_syscall:
	.cfi_startproc
	mov %rdi, %rax
	mov %rsi, %rdi
	mov %rdx, %rsi
	mov %rcx, %rdx
	mov %r8, %r10
	mov %r9, %r8
	mov 8(%rsp), %r9
deputy_syscall_check:
	cmpq $0, deputy_signals_pending(%rip)
	jne deputy_syscall_cancelled
deputy_syscall_insn:
	syscall
	ret
deputy_syscall_cancelled:
	mov $-4, %rax          // -EINTR
	ret
	.cfi_endproc
	.size deputy_syscall, .-deputy_syscall

	.bss
	.align 8
	.globl deputy_signals_pending
	.hidden deputy_signals_pending
	.type deputy_signals_pending, @object
deputy_signals_pending:
	.zero 8
	.size deputy_signals_pending, 8

	.section .note.GNU-stack, "", @progbits
