"""The sandbox: MBPP reference solutions pass, wrong programs fail, hostile programs are contained.

The containment tests that rely on root (the unprivileged uid) or on namespaces (root with
CAP_SYS_ADMIN) are skipped where those are not available.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from gem_bench.sandbox import NOBODY, STDERR_TAIL, SandboxLimits, run_program, run_programs
from gem_bench.tasks.generation import mbpp_program

MBPP_TEST = Path("/work/shared/data/hub/google-research-datasets/mbpp/full/test.jsonl")
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the uid drop needs root (see gem_bench/sandbox.py)")
# Namespaces need root with CAP_SYS_ADMIN; without them network and /tmp are not isolated.
ISOLATED = run_program("pass", SandboxLimits(timeout_s=10)).isolated
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="the sandbox cannot create namespaces here")
FAST = SandboxLimits(timeout_s=3, cpu_s=2)


def reference_programs(limit: int | None = None) -> list[tuple[int, str]]:
    if not MBPP_TEST.is_file():
        pytest.skip(f"MBPP mirror {MBPP_TEST} not present")
    rows = [json.loads(line) for line in MBPP_TEST.read_text(encoding="utf-8").splitlines()][:limit]
    return [
        (row["task_id"], mbpp_program(row["code"].replace("\r\n", "\n"), row["test_setup_code"], row["test_list"]))
        for row in rows
    ]


def check_references(limit: int | None) -> None:
    programs = reference_programs(limit)
    results = run_programs([src for _, src in programs], SandboxLimits(timeout_s=30, cpu_s=20), workers=4)
    failed = {tid: (r.status, r.stderr[-300:]) for (tid, _), r in zip(programs, results) if not r.passed}
    print(f"MBPP reference solutions: {len(programs) - len(failed)}/{len(programs)} pass their own tests")
    assert not failed, failed


def test_mbpp_reference_solutions_pass_fast_subset():
    check_references(30)  # task ids 11-40


@pytest.mark.slow
def test_mbpp_reference_solutions_pass_all():
    check_references(None)  # all 500 (about 20 s on 2 cores)


def test_wrong_programs_fail():
    wrong = "def add(a, b):\n    return a - b\nassert add(1, 2) == 3\n"
    result = run_program(wrong, FAST)
    assert (result.passed, result.status, result.returncode) == (False, "failed", 1)
    assert "AssertionError" in result.stderr
    assert run_program("def f(:\n", FAST).status == "failed"  # syntax error
    assert run_program("raise SystemExit(3)", FAST).status == "failed"
    ok = run_program("def add(a, b):\n    return a + b\nassert add(1, 2) == 3\n", FAST)
    assert (ok.passed, ok.status, ok.returncode) == (True, "passed", 0)
    assert ok.isolated == ISOLATED and (ROOT or not ISOLATED)


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=2, cpu_s=1))
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 10


def test_memory_limit():
    result = run_program("x = bytearray(10 * 1024**3)\n", FAST)
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_file_size_limit_and_work_dir_is_writable():
    ok = run_program("open('small', 'w').write('a' * 1000)\nimport os\nassert os.path.getsize('small') == 1000\n", FAST)
    assert ok.passed
    big = run_program("open('big', 'wb').write(b'a' * (4 << 20))\n", SandboxLimits(timeout_s=3, file_bytes=1 << 20))
    assert big.status == "failed" and "File too large" in big.stderr


def test_stderr_flood_is_capped():
    flood = "import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n"
    result = run_program(flood, SandboxLimits(timeout_s=5, file_bytes=1 << 20))
    assert not result.passed and len(result.stderr) <= STDERR_TAIL


def test_parent_environment_not_visible(monkeypatch):
    monkeypatch.setenv("GEM_SANDBOX_SECRET", "hunter2")
    program = (
        "import os\n"
        "assert 'GEM_SANDBOX_SECRET' not in os.environ, 'secret leaked'\n"
        "assert 'hunter2' not in repr(dict(os.environ))\n"
        "assert sorted(os.environ) == ['HOME', 'LANG', 'PATH'], sorted(os.environ)\n"
    )
    result = run_program(program, FAST)
    assert result.passed, result.stderr


@needs_root
def test_runs_as_unprivileged_uid_and_cannot_read_parent_environ():
    program = (
        "import os\n"
        f"assert os.getuid() == os.geteuid() == {NOBODY} and os.getgid() == {NOBODY}\n"
        "assert os.getgroups() == []\n"
        f"open('/proc/{os.getpid()}/environ').read()\n"
    )
    result = run_program(program, FAST)
    assert result.status == "failed" and "PermissionError" in result.stderr, result.stderr


@needs_isolation
def test_files_outside_work_dir_survive(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o666)  # even a world-writable file must not change
    tmp_path.chmod(0o777)
    for program in (
        f"import os\nos.remove({str(victim)!r})\n",
        f"open({str(victim)!r}, 'w').write('changed')\n",
        "open('/tmp/gem-sandbox-escape', 'w').write('x')\nraise SystemExit(1)\n",
    ):
        assert not run_program(program, FAST).passed
    assert victim.read_text() == "original"
    assert not Path("/tmp/gem-sandbox-escape").exists()


@needs_isolation
def test_no_network():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        result = run_program(program, FAST)
        assert result.status == "failed" and "OSError" in result.stderr, result.stderr
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            if int(uids.split()[1]) == uid:
                pids.append(int(entry.name))
    return pids


@needs_root
def test_fork_bomb_is_contained():
    deadline = time.monotonic() + 15  # an earlier test's sandbox may still be tearing down
    while _processes_of(NOBODY) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_of(NOBODY), "processes of uid nobody already running; not testing"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run_program(bomb, SandboxLimits(timeout_s=3, cpu_s=2, nproc=8))
    assert not result.passed and result.status == "timeout"
    assert time.monotonic() - start < 15
    deadline = time.monotonic() + 5  # the PID namespace is torn down asynchronously
    while _processes_of(NOBODY) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_of(NOBODY), "fork bomb processes survived"
