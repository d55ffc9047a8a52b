#!/usr/bin/env python3
"""Runs one migration test program (tests/migrate/*.cc, CRIU's zdtm shape) through a checkpoint.

    run.py BUILD_DIR NAME

1. keep-running: start NAME natively, wait for DIR/ready, `migrate PID checkpoint FILE`, create
   DIR/go and write "go\n" to its standard input: the original, which was stopped, inspected by
   injected syscalls and let go, must pass.
2. resume: start NAME again, checkpoint it, SIGKILL the original, `mosrun -R FILE`, create
   DIR/go and write "go\n" to mosrun's standard input: the resumed process must pass.
NAME=corrupt checks instead that damaged checkpoints are refused with a clear error; NAME=
unresumable that a checkpoint holding a pipe and a socket is refused naming both; NAME=refused
that a process with two threads or a shared writable file mapping is not checkpointed and runs on;
NAME=xz that xz, checkpointed while it compresses and resumed, writes what a native run writes.
Needs root (ptrace of a non-child, PR_SET_MM); exits 77 (skip) otherwise.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

DEADLINE = 60.0


def wait_for(what, condition, deadline=DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f'timed out after {deadline} s waiting for {what}')


class Case:
    def __init__(self, build, name):
        self.build = build
        self.name = name
        self.program = os.path.join(build, 'tests', 'migrate', 'migrate_' + name)
        self.migrate = os.path.join(build, 'tools', 'migrate')
        self.mosrun = os.path.join(build, 'tools', 'mosrun')
        self.tmp = tempfile.mkdtemp(prefix=f'umosix-migrate-{name}-')

    def start(self, program=None, *args, prefix=()):
        work = tempfile.mkdtemp(dir=self.tmp)
        proc = subprocess.Popen([*prefix, program or self.program, work, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.PIPE)
        wait_for(f'{self.name} to be ready',
                 lambda: os.path.exists(os.path.join(work, 'ready')) or proc.poll() is not None)
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors='replace')
            if proc.returncode == 77:
                print(out)
                sys.exit(77)
            raise AssertionError(f'{self.name} ended before it was ready ({proc.returncode}):\n{out}')
        return proc, work

    def checkpoint(self, proc, image):
        r = subprocess.run([self.migrate, str(proc.pid), 'checkpoint', image],
                           capture_output=True, text=True, timeout=DEADLINE)
        print(r.stdout + r.stderr, end='')
        assert r.returncode == 0, f'migrate checkpoint failed ({r.returncode}): {r.stderr}'
        assert os.path.getsize(image) > 0

    def finish(self, proc, work, what):
        open(os.path.join(work, 'go'), 'w').close()
        out, _ = proc.communicate(input=b'go\n', timeout=DEADLINE)
        out = out.decode(errors='replace')
        print(f'--- {what}:\n{out}', end='')
        assert proc.returncode == 0 and 'PASS' in out, f'{what} failed ({proc.returncode})'

    def resume(self, image, **kwargs):
        return subprocess.Popen([self.mosrun, '-R', image], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.PIPE, **kwargs)

    def run(self):
        # 1. The original keeps running after its checkpoint.
        proc, work = self.start()
        self.checkpoint(proc, os.path.join(self.tmp, 'keep.img'))
        self.finish(proc, work, 'original after its checkpoint')
        # 2. Checkpoint, kill, resume.
        proc, work = self.start()
        image = os.path.join(self.tmp, 'resume.img')
        self.checkpoint(proc, image)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = self.resume(image)
        self.finish(resumed, work, 'resumed from the checkpoint')

    def refused(self, image, *expected):
        r = subprocess.run([self.mosrun, '-R', image], capture_output=True, text=True,
                           timeout=DEADLINE, stdin=subprocess.DEVNULL)
        print(f'--- mosrun -R {os.path.basename(image)}: {r.returncode}\n{r.stderr}', end='')
        assert r.returncode == 125, f'mosrun -R {image} was not refused ({r.returncode})'
        for e in expected:
            assert e in r.stderr, f'"{e}" not in the error'
        assert 'PASS' not in r.stdout
        return r.stderr

    def run_corrupt(self):
        # A good checkpoint of the memory test, and damaged copies of it.
        self.program = os.path.join(self.build, 'tests', 'migrate', 'migrate_memory')
        proc, work = self.start()
        good = os.path.join(self.tmp, 'good.img')
        self.checkpoint(proc, good)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = open(good, 'rb').read()

        def variant(name, content):
            path = os.path.join(self.tmp, name)
            with open(path, 'wb') as f:
                f.write(content)
            return path

        self.refused(variant('empty.img', b''), 'not a umosix migration image')
        self.refused(variant('garbage.img', b'#!/bin/sh\necho hello\n' * 100),
                     'not a umosix migration image')
        self.refused(variant('short-header.img', data[:200]), 'truncated')
        self.refused(variant('truncated.img', data[:len(data) // 2]), 'truncated')
        self.refused(variant('no-end.img', data[:-64]), 'truncated')
        flipped = bytearray(data)
        flipped[len(data) * 2 // 3] ^= 0x40
        self.refused(variant('flipped.img', bytes(flipped)), 'corrupt')
        self.refused(variant('trailing.img', data + b'\0' * 8), 'corrupt')
        header = bytearray(data)
        header[8 + 24] ^= 0x01  # inside the header message's root struct
        self.refused(variant('header.img', bytes(header)), 'migration image')
        # The good one still resumes.
        resumed = self.resume(good)
        self.finish(resumed, work, 'resumed from the good checkpoint')

    def run_refused(self, mode, expected):
        self.program = os.path.join(self.build, 'tests', 'migrate', 'migrate_refused')
        proc, work = self.start(None, mode)
        image = os.path.join(self.tmp, mode + '.img')
        r = subprocess.run([self.migrate, str(proc.pid), 'checkpoint', image],
                           capture_output=True, text=True, timeout=DEADLINE)
        print(f'--- migrate ({mode}): {r.returncode}\n{r.stderr}', end='')
        assert r.returncode == 1, f'migrate did not refuse ({r.returncode})'
        assert expected in r.stderr, f'"{expected}" not in the error'
        assert not [f for f in os.listdir(self.tmp) if f.startswith(mode)], 'a file was left'
        self.finish(proc, work, f'original after the refused checkpoint ({mode})')

    def run_xz(self, threads=1):
        """A real program: xz -6 of 6 MB, checkpointed while it compresses, killed, resumed: its
        output file (reopened by path and offset, the self-pipe recreated) is byte-identical to
        a native run's."""
        import random
        xz = shutil.which('xz')
        if xz is None:
            print('no xz: skipped')
            sys.exit(77)
        rng = random.Random(8)
        words = [''.join(rng.choice('abcdefghij') for _ in range(rng.randint(2, 9)))
                 for _ in range(5000)]
        src = os.path.join(self.tmp, 'in.txt')
        with open(src, 'w') as f:
            f.write(' '.join(rng.choice(words) for _ in range(1000000)))
        # Threaded: 1 MiB blocks, so output (the cue to checkpoint) starts long before the end
        # while both workers compress.
        args = ['-6'] if threads == 1 else ['-6', f'-T{threads}', '--block-size=1MiB']
        native = os.path.join(self.tmp, 'native.xz')
        with open(native, 'wb') as out:
            subprocess.run([xz, *args, '-c', src], stdout=out, check=True, timeout=600)
        moved = os.path.join(self.tmp, 'moved.xz')
        with open(moved, 'wb') as out:
            proc = subprocess.Popen([xz, *args, '-c', src], stdout=out, stdin=subprocess.DEVNULL)
        wait_for('xz to write', lambda: os.path.getsize(moved) > 0 or proc.poll() is not None,
                 600)
        assert proc.poll() is None, 'xz ended before its checkpoint: make the input larger'
        image = os.path.join(self.tmp, 'xz.img')
        self.checkpoint(proc, image)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        print(f'checkpointed after {os.path.getsize(moved)} of {os.path.getsize(native)} bytes')
        r = subprocess.run([self.mosrun, '-R', image], timeout=600, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f'resumed xz failed ({r.returncode})'
        assert open(moved, 'rb').read() == open(native, 'rb').read(), 'outputs differ'

    def run_auto(self):
        """mosrun -C FILE -A MINUTES: the memory test, checkpointed every 0.12 s while it waits.
        The original passes after several checkpoints; a checkpoint taken after it was ready,
        resumed once it is killed, passes too."""
        self.program = os.path.join(self.build, 'tests', 'migrate', 'migrate_memory')
        for phase in ('original', 'resumed'):
            image = os.path.join(self.tmp, phase + '.img')
            proc, work = self.start(prefix=(self.mosrun, '-C', image, '-A', '0.002'))
            ready = os.stat(os.path.join(work, 'ready')).st_mtime_ns
            seen = set()

            def rewritten_after_ready():
                try:
                    st = os.stat(image)  # each checkpoint is a new file renamed over the last
                except FileNotFoundError:
                    return False
                if st.st_mtime_ns > ready:
                    seen.add(st.st_ino)
                return len(seen) >= 3
            wait_for('three checkpoints after ready', rewritten_after_ready)
            if phase == 'original':
                self.finish(proc, work, 'original after periodic checkpoints')
                continue
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # The checkpointer ends with the job: the file stays the last complete checkpoint.
            wait_for('the checkpointer to end', lambda: not checkpointer_alive(image))
            self.finish(self.resume(image), work, 'resumed from a periodic checkpoint')

    def run_threads_in_use(self):
        """A checkpoint of the threads test resumed while the original still runs: its threads'
        ids are taken, and mosrun -R refuses it, naming them, before touching anything."""
        proc, work = self.start()
        image = os.path.join(self.tmp, 'in_use.img')
        self.checkpoint(proc, image)
        self.refused(image, 'of the image is in use here')
        self.finish(proc, work, 'original beside its refused resume')

    def run_unresumable(self):
        proc, work = self.start()
        image = os.path.join(self.tmp, 'pipe.img')
        self.checkpoint(proc, image)
        err = self.refused(image, 'fd 8: a socket', 'fd 12: a pipe (pipe:',
                           'the process at its other end is gone')
        assert 'fd 7' not in err, 'the self-pipe holding data was refused'
        self.finish(proc, work, 'original after its checkpoint')


def checkpointer_alive(image):
    """Whether a process still has a temporary file of `image` open or is about to write one:
    any mosrun process whose command line names `image` (the checkpointer is a fork of it)."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            cmdline = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\0')
        except OSError:
            continue
        if image.encode() in cmdline and os.path.basename(cmdline[0]) == b'mosrun':
            return True
    return False


def main():
    build, name = sys.argv[1], sys.argv[2]
    if os.geteuid() != 0:
        print('needs root (ptrace of a non-child, PR_SET_MM): skipped')
        return 77
    case = Case(build, name)
    try:
        if name == 'corrupt':
            case.run_corrupt()
        elif name == 'unresumable':
            case.run_unresumable()
        elif name == 'threads':
            case.run()
            case.run_threads_in_use()
        elif name == 'auto':
            case.run_auto()
        elif name == 'xz':
            case.run_xz()
        elif name == 'xz_threads':
            case.run_xz(threads=2)
        elif name == 'refused':
            case.run_refused('shared_file', 'a shared writable file mapping cannot be checkpointed')
        else:
            case.run()
    finally:
        shutil.rmtree(case.tmp, ignore_errors=True)
    print('ok')
    return 0


if __name__ == '__main__':
    sys.exit(main())
