"""Run untrusted programs (MBPP generations plus their asserts) with limits.

Each program runs in its own process, started through a small launcher (``_LAUNCHER``, a fresh
single-threaded interpreter, so nothing privileged happens in a forked copy of a threaded
parent). Always:

- wall-clock timeout; on expiry the whole process group is killed;
- rlimits: CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE),
  processes (RLIMIT_NPROC), no core files;
- a scrubbed environment (PATH, LANG, HOME only), ``python -I`` (isolated mode: no user
  site, no PYTHON* variables, no script directory on sys.path), the program read from stdin;
  stdout is discarded and stderr goes to an unlinked file (capped by RLIMIT_FSIZE), of which
  the result keeps the tail;
- the working directory is an empty temporary directory, removed afterwards.

When we are root, additionally:

- the program runs as an unprivileged uid (``nobody``, 65534, by default): root ignores
  RLIMIT_NPROC, and as ``nobody`` the repository and the parent's ``/proc/<pid>/environ`` are
  out of reach. RLIMIT_NPROC counts every process of that uid, so programs running in parallel
  share the budget (MBPP programs do not fork);
- new network, mount and PID namespaces: no network at all (only a down loopback); the work
  directory is a size-limited tmpfs and the world-writable directories (/tmp, /var/tmp,
  /dev/shm, /run/lock) are shadowed by private tmpfs mounts, so nothing the program writes
  reaches the disk or outlives it; the program is PID 1 of its namespace, so when it ends or
  is killed, every process it started dies too.

If the namespaces cannot be created (a container without CAP_SYS_ADMIN), or when we are not
root, the program still gets the limits and the scrubbed environment, but the network is NOT
isolated, world-writable directories stay writable and children that leave the process group
may outlive the run; ``SandboxResult.isolated`` is False and a warning is logged once.

The interpreter for the program is ``sys.executable`` if the unprivileged uid can execute it,
else the first of /usr/local/bin, /usr/bin, /bin ``python3`` it can (a pyenv Python under a
0700 /root is out of its reach).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

NOBODY = 65534
LAUNCH_ERROR = 125  # the launcher's exit code when it could not start the program
NOT_ISOLATED = "gem-sandbox: not isolated: "  # the launcher's stderr line when namespaces fail
STDERR_TAIL = 2000


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # RLIMIT_AS of the program
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file it may write
    nproc: int = 32  # RLIMIT_NPROC (enforced for the unprivileged uid only)
    tmpfs_bytes: int = 64 << 20  # size of each private tmpfs (work dir, /tmp, ...)
    uid: int = NOBODY  # the uid (and gid) the program runs as when we are root


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    returncode: int | None
    stderr: str  # the last STDERR_TAIL characters
    isolated: bool  # network/mount/PID namespaces were in place


# Runs as the caller's user (root: privileged), stdlib only. argv[1]: JSON settings.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18

def fail(what):
    err = ctypes.get_errno()
    sys.stderr.write("gem-sandbox: %s failed: %s\n" % (what, os.strerror(err)))
    os._exit(125)

def tmpfs(path, mode, owner):
    opts = "size=%d,mode=%s,uid=%d,gid=%d" % (cfg["tmpfs_bytes"], mode, owner, owner)
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) != 0:
        fail("mounting a tmpfs on " + path)

isolated = False
if cfg["root"]:
    if libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET) == 0:
        isolated = True
    else:
        sys.stderr.write("gem-sandbox: not isolated: unshare: %s\n" % os.strerror(ctypes.get_errno()))
if isolated:
    # Our mounts must not propagate back to the host's mount table.
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        fail("making / private")
    # The work dir becomes a size-limited tmpfs; entering it before /tmp is shadowed keeps it
    # reachable as the current directory.
    tmpfs(cfg["workdir"], "0700", cfg["uid"])
    os.chdir(cfg["workdir"])
    for path in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(path) and not os.path.islink(path):
            tmpfs(path, "1777", 0)
else:
    os.chdir(cfg["workdir"])

pid = os.fork() if isolated else 0  # the child is PID 1 of the new PID namespace
if pid == 0:
    try:
        limits = {
            resource.RLIMIT_CPU: (cfg["cpu_s"], cfg["cpu_s"] + 1),
            resource.RLIMIT_AS: (cfg["memory_bytes"],) * 2,
            resource.RLIMIT_FSIZE: (cfg["file_bytes"],) * 2,
            resource.RLIMIT_NPROC: (cfg["nproc"],) * 2,
            resource.RLIMIT_CORE: (0, 0),
        }
        for kind, value in limits.items():
            resource.setrlimit(kind, value)
        if cfg["root"]:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        os.execve(cfg["python"], [cfg["python"], "-I", "-"], cfg["env"])
    except OSError as err:
        sys.stderr.write("gem-sandbox: starting the program failed: %s\n" % err)
        os._exit(125)
_, status = os.waitpid(pid, 0)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""

_warned_not_isolated = False


def _others_can_execute(path: str) -> bool:
    """Whether a uid with no special rights can execute ``path`` (every directory above it
    searchable by others, the file executable by others)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def program_python(root: bool) -> str:
    """The interpreter the program runs under (see the module docstring)."""
    if not root or _others_can_execute(sys.executable):
        return sys.executable
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        candidate = shutil.which("python3", path=directory)
        if candidate and _others_can_execute(candidate):
            return candidate
    raise RuntimeError(
        f"sandbox: no Python the unprivileged uid can execute ({sys.executable} is not, nor is a "
        "python3 in /usr/local/bin, /usr/bin or /bin); install python3 system-wide"
    )


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run one Python program; ``passed`` when it exits with status 0 within the limits."""
    global _warned_not_isolated
    root = os.geteuid() == 0
    try:
        python = program_python(root)
    except RuntimeError as err:  # reported per program, so a run still finishes
        return SandboxResult(False, "error", None, str(err), False)
    workdir = tempfile.mkdtemp(prefix="gem-sandbox-")
    try:
        if root:
            os.chown(workdir, limits.uid, limits.uid)
        settings = {
            "root": root,
            "workdir": workdir,
            "uid": limits.uid,
            "python": python,
            "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir},
            "cpu_s": limits.cpu_s,
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.file_bytes,
            "nproc": limits.nproc,
            "tmpfs_bytes": limits.tmpfs_bytes,
        }
        # stderr goes to an unlinked file, not a pipe: RLIMIT_FSIZE caps what the program can
        # write there, and a child that escapes the group cannot keep us waiting on a pipe.
        with tempfile.TemporaryFile() as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(settings)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
                env={"PATH": settings["env"]["PATH"], "LANG": "C.UTF-8"},
                cwd="/",
                start_new_session=True,  # its own process group, killed as a whole
            )
            try:
                proc.communicate(source.encode(), timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # also whatever the program left behind in its group
            proc.wait()
            err_file.seek(0)
            head = err_file.read(256).decode(errors="replace")  # the launcher's own line, if any
            err_file.seek(max(0, err_file.seek(0, os.SEEK_END) - 4 * STDERR_TAIL))
            stderr = err_file.read().decode(errors="replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    isolated = root and not head.startswith(NOT_ISOLATED)
    if not isolated and not _warned_not_isolated:
        _warned_not_isolated = True
        reason = head[len(NOT_ISOLATED) :].split("\n")[0] if root else "not running as root"
        log.warning(
            "sandbox: generated programs run WITHOUT network/mount/PID isolation (%s); "
            "only rlimits, a scrubbed environment and a temporary work dir apply",
            reason,
        )
    code = proc.returncode
    # Killed by a signal: negative from Popen, 128 + signal through the isolated launcher.
    signalled = 128 - code if code < 0 else code
    if timed_out or signalled in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        status = "timeout"
    elif code == LAUNCH_ERROR and "gem-sandbox:" in stderr:
        status = "error"
    else:
        status = "passed" if code == 0 else "failed"
    return SandboxResult(status == "passed", status, code, stderr[-STDERR_TAIL:], isolated)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def run_programs(
    sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 4
) -> list[SandboxResult]:
    """Run many programs with a small thread pool (each in its own sandboxed process)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda src: run_program(src, limits), sources))
