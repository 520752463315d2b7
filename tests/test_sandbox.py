"""The code sandbox: each hostile program is contained AND bounds itself, so a broken sandbox fails the
test instead of taking the machine down (the fork loop stops at 2000, the allocation at 4 GiB)."""

import json
import os
import socket
import time
from pathlib import Path

import pytest

from amrlhf.errors import AmrlhfError
from amrlhf.evaluation.humaneval import pass_at_k, program, run_completions, score
from amrlhf.evaluation.sandbox import ALLOW_ENV, Limits, isolation, run_python


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "1")


def test_refused_without_the_opt_in(monkeypatch, tmp_path):
    monkeypatch.delenv(ALLOW_ENV)
    marker = tmp_path / "ran"
    with pytest.raises(AmrlhfError, match="allow_code_execution: true"):
        run_python(f"open({str(marker)!r}, 'w').write('x')")
    assert not marker.exists()


def test_fresh_process_clean_environment_own_temp_dir(monkeypatch):
    monkeypatch.setenv("AMRLHF_TEST_SECRET", "hunter2")
    out = run_python("import json, os, sys\n"
                     "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'pid': os.getpid(),"
                     " 'uid': os.getuid(), 'path': sys.path}))")
    assert out.passed, out.stderr
    seen = json.loads(out.stdout)
    assert "AMRLHF_TEST_SECRET" not in seen["env"] and ALLOW_ENV not in seen["env"]
    assert set(seen["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE"}
    assert Path(seen["cwd"]).name.startswith("amrlhf-sandbox-") and seen["env"]["HOME"] == seen["cwd"]
    assert seen["pid"] != os.getpid()
    assert not any("site-packages" in p for p in seen["path"])  # -I -S: not the project's environment
    assert not Path(seen["cwd"]).exists()  # removed afterwards
    if os.geteuid() == 0:
        assert seen["uid"] != 0  # root drops to an unprivileged user first


def test_infinite_loop_is_killed_at_the_wall_time_limit():
    start = time.perf_counter()
    out = run_python("while True:\n    pass\n", Limits(wall_s=1.5, cpu_s=30))
    assert out.status == "timeout" and not out.passed
    assert time.perf_counter() - start < 10


def test_cpu_time_limit_kills_a_busy_loop_before_the_wall_time():
    out = run_python("while True:\n    pass\n", Limits(wall_s=30, cpu_s=1))
    assert out.status == "failed" and out.seconds < 15


def test_process_spawning_loop_is_contained():
    """Each fork sleeps, so forks accumulate; the loop stops itself at 2000 whatever happens."""
    src = ("import os, time\nn = 0\nfor _ in range(2000):\n    try:\n        pid = os.fork()\n"
           "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
           "    n += 1\nprint(n)\n")
    out = run_python(src, Limits(wall_s=20, nproc=16))
    forked = int(out.stdout.strip().splitlines()[-1])
    assert forked < 16, out  # RLIMIT_NPROC stopped it (2000 would mean the sandbox is broken)
    time.sleep(0.5)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, "amrlhf-sandbox-")]
    assert not left  # every sleeping child was killed with the sandbox


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_huge_allocation_hits_the_memory_ceiling():
    """4 GiB in 64 MiB steps, touched, against a 512 MiB address-space ceiling."""
    src = ("chunks = []\ntry:\n    for _ in range(64):\n        chunks.append(b'x' * (64 << 20))\n"
           "except MemoryError:\n    print(len(chunks) * 64)\n    raise SystemExit(3)\nprint(len(chunks) * 64)\n")
    out = run_python(src, Limits(memory_bytes=512 << 20, wall_s=30))
    assert out.returncode == 3 and int(out.stdout) < 512, out


def test_write_outside_the_temp_dir_to_a_root_owned_path_fails():
    targets = ["/etc/amrlhf-sandbox-probe", "/usr/amrlhf-sandbox-probe"]
    src = (f"for t in {targets!r}:\n    try:\n        open(t, 'w').write('x')\n"
           "        print('wrote', t)\n    except OSError as e:\n        print('denied', t, e.errno)\n")
    out = run_python(src)
    assert out.stdout.count("denied") == 2 and "wrote" not in out.stdout, out
    assert not any(Path(t).exists() for t in targets)


def test_file_size_limit():
    out = run_python("open('big', 'wb').write(b'x' * (8 << 20))\n", Limits(file_bytes=1 << 20))
    assert out.status == "failed"


def test_network_is_cut_where_the_os_allows():
    if not isolation().network_cut:
        pytest.skip("unshare is not usable here: the sandbox runs WITHOUT a network cut (docs/sandbox.md)")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        out = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
    assert out.status == "failed" and "Error" in out.stderr


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)   # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(3, 0, 1) == 0.0 and pass_at_k(2, 2, 1) == 1.0 and pass_at_k(5, 4, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_canonical_solutions_pass_and_wrong_ones_fail(eval_slot_assets):
    rows = [json.loads(x) for x in (eval_slot_assets / "data" / "humaneval" / "test.jsonl").read_text().splitlines()]
    assert all(score(r, [r["canonical_solution"]]) == {"pass_at_1": 1.0} for r in rows)
    doc = rows[0]
    assert score(doc, ["    return x - y\n"]) == {"pass_at_1": 0.0}
    assert score(doc, [doc["canonical_solution"], "    return 0\n"]) == {"pass_at_1": 0.5}
    hang = run_completions(doc, ["    while True:\n        pass\n"], Limits(wall_s=1))[0]
    assert hang.status == "timeout"
    assert program(doc, "    return x + y\n", "t0k").endswith(f"check({doc['entry_point']})\nprint('t0k')\n")


@pytest.mark.parametrize("completion", [
    "    import sys\n    sys.exit(0)\n",                # exits with status 0 when check() calls it
    "    raise SystemExit\n",
    "    return 0\nimport os\nos._exit(0)\n",           # exits before the tests run at all
])
def test_exiting_with_status_zero_is_not_a_pass(completion):
    doc = {"prompt": "def add(x, y):\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
           "entry_point": "add"}
    assert score(doc, [completion]) == {"pass_at_1": 0.0}
    assert score(doc, ["    return x + y\n"]) == {"pass_at_1": 1.0}
    assert score(doc, ["    print('chatty')\n    return x + y\n"]) == {"pass_at_1": 1.0}
