"""The code sandbox: each hostile program is contained AND bounds itself, so a broken sandbox fails the
test instead of taking the machine down (the fork loop stops at 2000, the allocation at 4 GiB)."""

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amrlhf.errors import AmrlhfError
from amrlhf.evaluation import sandbox
from amrlhf.evaluation.harness import code_execution
from amrlhf.evaluation.humaneval import check_returned, pass_at_k, program, run_completions, score
from amrlhf.evaluation.sandbox import ALLOW_ENV, Limits, Outcome, isolation, run_python


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


# The child owns its temp dir, so it can replace the files its output went to. The evaluator must read
# that output only through its own handles: each trick below runs in a separate evaluating process
# (`sandbox.py` loaded alone: no torch import), killed after DEADLINE s, so a sandbox that hangs fails
# the test instead of hanging the suite.
DEADLINE = 60
ROOT = Path(__file__).resolve().parents[1]
_EVALUATOR = """import dataclasses, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox_alone", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
print(json.dumps(dataclasses.asdict(mod.run_python(sys.stdin.read(), mod.Limits(wall_s=10)))))
"""
_REPLACE = ("import os\nfor name in ('stdout.txt', 'stderr.txt'):\n    try:\n        os.remove(name)\n"
            "    except OSError:\n        pass\n")


def _evaluate_elsewhere(source: str, **env: str) -> Outcome:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _EVALUATOR, sandbox.__file__], input=source,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                              timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the evaluator hung: no outcome after {DEADLINE} s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.perf_counter() - start < DEADLINE
    return Outcome(**json.loads(proc.stdout.splitlines()[-1]))


def test_output_files_replaced_by_fifos_neither_hang_the_evaluator_nor_leave_the_temp_dir():
    src = "import os\nprint(os.getcwd(), flush=True)\n" + _REPLACE + "    os.mkfifo(name)\n"
    out = _evaluate_elsewhere(src)
    assert out.status == "passed", out
    tmp = Path(out.stdout.strip())
    assert tmp.name.startswith("amrlhf-sandbox-") and not tmp.exists()  # removed, FIFOs and all


def test_stdout_symlinked_to_the_program_then_os_exit_is_not_a_pass():
    """program.py holds the pass token; a wrong answer that points stdout.txt at it must still fail."""
    doc = {"prompt": "def add(x, y):\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
           "entry_point": "add"}
    completion = ("    import os\n    try:\n        os.remove('stdout.txt')\n    except OSError:\n        pass\n"
                  "    os.symlink('program.py', 'stdout.txt')\n    os._exit(0)\n")
    token = secrets.token_hex(16)
    out = check_returned(_evaluate_elsewhere(program(doc, completion, token)), token)
    assert token not in out.stdout and out.status == "failed", out


@pytest.mark.parametrize("target", ["/proc/self/environ", "file"])
def test_output_files_symlinked_elsewhere_reveal_nothing_of_the_evaluator(target, tmp_path):
    """A symlink is resolved by whoever opens it: the evaluator's environment (/proc/self/environ) or a
    file only it may read (like /etc/shadow) must not come back as the program's output."""
    secret = "amrlhf-secret-" + secrets.token_hex(8)
    if target == "file":
        (tmp_path / "shadow").write_text(secret)
        (tmp_path / "shadow").chmod(0o600)
        target = str(tmp_path / "shadow")
    out = _evaluate_elsewhere(_REPLACE + f"    os.symlink({target!r}, name)\n", AMRLHF_TEST_SECRET=secret)
    assert out.status == "passed", out
    assert secret not in out.stdout + out.stderr and "AMRLHF_TEST_SECRET" not in out.stdout + out.stderr, out


# Without a usable `unshare` the child runs without namespaces: one warning line per evaluation says so.
ADD = {"prompt": "def add(x, y):\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
       "entry_point": "add"}


@pytest.fixture
def fresh_probe(monkeypatch):
    sandbox.isolation.cache_clear()
    monkeypatch.setattr(sandbox, "_announced", False)
    yield
    sandbox.isolation.cache_clear()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == sandbox.__name__ and r.levelno >= logging.WARNING]


def test_the_fallback_without_unshare_warns_once_per_evaluation(monkeypatch, caplog, fresh_probe):
    monkeypatch.setattr(sandbox, "UNSHARE", "amrlhf-no-such-unshare")  # what the probe looks for
    caplog.set_level(logging.WARNING, logger=sandbox.__name__)
    for evaluation in (1, 2):
        with code_execution(True, sandboxed=True):
            assert score(ADD, ["    return x + y\n", "    return 0\n", "    return x + y\n"]) == {
                "pass_at_1": pytest.approx(2 / 3)}
        assert len(_warnings(caplog)) == evaluation, _warnings(caplog)  # one per evaluation, not per program
    assert not isolation().network_cut
    (line,) = set(_warnings(caplog))
    assert "no usable `unshare`" in line and "NO network cut" in line and "double fork + setsid" in line
    assert "\n" not in line


def test_a_plain_run_without_an_evaluation_warns_once_per_process(monkeypatch, caplog, fresh_probe):
    monkeypatch.setattr(sandbox, "UNSHARE", "amrlhf-no-such-unshare")
    caplog.set_level(logging.WARNING, logger=sandbox.__name__)
    assert all(run_python("print(1)").passed for _ in range(3))
    assert len(_warnings(caplog)) == 1, _warnings(caplog)


def test_no_fallback_warning_when_unshare_isolates(caplog, fresh_probe):
    if not isolation().network_cut:
        pytest.skip("unshare is not usable here: the sandbox runs in its fallback (docs/sandbox.md)")
    caplog.set_level(logging.WARNING, logger=sandbox.__name__)
    with code_execution(True, sandboxed=True):
        assert score(ADD, ["    return x + y\n", "    return 0\n"]) == {"pass_at_1": 0.5}
    assert run_python("print(1)").passed
    assert not _warnings(caplog)
