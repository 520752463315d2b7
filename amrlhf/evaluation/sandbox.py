"""Run untrusted Python (model-written code) in a separate, limited process.

One call = one fresh process, started from an empty environment in its own temporary directory,
under CPU, memory, process-count and file-size rlimits and a wall-time limit; its network is cut
where the OS allows (a new network namespace through util-linux `unshare`; Python 3.11 has no
`os.unshare`), and under root it first drops to an unprivileged user, since root ignores the
process-count limit. docs/sandbox.md states exactly what this does and does not guarantee.

Nothing runs unless the caller opted in: `AMRLHF_ALLOW_CODE_EXECUTION=1`, which `amrlhf eval`
sets (only for the duration of the evaluation) from a suite's `allow_code_execution: true`.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from amrlhf.errors import AmrlhfError

log = logging.getLogger(__name__)

ALLOW_ENV = "AMRLHF_ALLOW_CODE_EXECUTION"
UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0                  # killed (the whole process group / PID namespace) after this
    cpu_s: int = 10                       # RLIMIT_CPU: SIGXCPU, then SIGKILL
    memory_bytes: int = 512 << 20         # RLIMIT_AS: address space per process
    nproc: int = 16                       # RLIMIT_NPROC: processes of the (unprivileged) user
    file_bytes: int = 16 << 20            # RLIMIT_FSIZE: largest file it may write
    output_bytes: int = 16 << 10          # how much of stdout / stderr is kept


@dataclass(frozen=True)
class Outcome:
    status: str              # "passed" (exit 0; HumanEval also needs its token), "failed" or "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    prefix: tuple[str, ...]   # argv before the interpreter: unshare / setpriv
    python: str               # interpreter the child runs (`-I -S`: no site-packages, no PYTHON* vars)
    network_cut: bool
    user: str                 # who the child runs as
    uid: int | None           # the uid to hand the temp dir to (under root), else None


def require_opt_in() -> None:
    if os.environ.get(ALLOW_ENV) != "1":
        raise AmrlhfError(
            "refusing to execute model-written code: set `allow_code_execution: true` in the evaluation suite "
            f"(or {ALLOW_ENV}=1 for a direct lm-eval run); it then runs in the sandbox of docs/sandbox.md")


def _drop_argv(uid: int, gid: int) -> tuple[str, ...]:
    return ("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs", "--")


def _candidates() -> list[tuple[tuple[str, ...], bool, str, int | None]]:
    """Ways to start the child, strongest first: (argv prefix, network cut, user, uid)."""
    net = ("unshare", "--net", "--pid", "--fork", "--kill-child")
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            raise AmrlhfError("running as root: the code sandbox needs `setpriv` (util-linux) to drop to an "
                              "unprivileged user; install util-linux or run as a non-root user")
        pw = pwd.getpwnam(UNPRIVILEGED_USER)
        drop = _drop_argv(pw.pw_uid, pw.pw_gid)
        return [((*net, "--", *drop), True, UNPRIVILEGED_USER, pw.pw_uid), (drop, False, UNPRIVILEGED_USER, pw.pw_uid)]
    me = pwd.getpwuid(os.getuid()).pw_name
    return [((net[0], "--user", *net[1:], "--"), True, me, None), ((), False, me, None)]


def _interpreters() -> list[str]:
    found = [os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)]
    system = shutil.which("python3", path="/usr/bin:/bin")
    return found + ([system] if system and system not in found else [])


@functools.cache
def isolation() -> Isolation:
    """Probe once per process which of the candidates works here (each candidate really starts a child)."""
    tried = []
    for prefix, net, user, uid in _candidates():
        if prefix and not shutil.which(prefix[0]):
            tried.append(f"{prefix[0]}: not installed")
            continue
        for python in _interpreters():
            argv = [*prefix, python, "-I", "-S", "-c", "pass"]
            proc = subprocess.run(argv, capture_output=True, text=True, env=_clean_env(Path("/")), cwd="/",
                                  timeout=30)
            if proc.returncode == 0:
                if not net:
                    log.warning("code sandbox: the network is NOT cut (unshare failed: %s)", "; ".join(tried))
                return Isolation(tuple(prefix), python, net, user, uid)
            tried.append(f"{' '.join(argv[:3])}...: {proc.stderr.strip()[-200:]}")
    raise AmrlhfError("no way to start a sandboxed child here: " + " | ".join(tried))


def _clean_env(tmp: Path) -> dict[str, str]:
    """Built from scratch: nothing of the parent's environment (tokens, keys, proxies) is passed on."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _set_limits(limits: Limits) -> None:
    """Runs in the child between fork and exec (before unshare / setpriv; rlimits survive exec)."""
    for which, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_bytes),
                         (resource.RLIMIT_NPROC, limits.nproc), (resource.RLIMIT_FSIZE, limits.file_bytes),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as fh:
        return fh.read(limit).decode("utf-8", errors="replace")


def run_python(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a Python program in the sandbox; -> Outcome. Refuses without the opt-in."""
    require_opt_in()
    iso = isolation()
    tmp = Path(tempfile.mkdtemp(prefix="amrlhf-sandbox-"))
    try:
        program = tmp / "program.py"
        program.write_text(source, encoding="utf-8")
        out, err = tmp / "stdout.txt", tmp / "stderr.txt"
        if iso.uid is not None:
            for p in (tmp, program):
                os.chown(p, iso.uid, -1)
        start = time.perf_counter()
        with open(out, "wb") as fout, open(err, "wb") as ferr:
            if iso.uid is not None:
                os.fchown(fout.fileno(), iso.uid, -1)
                os.fchown(ferr.fileno(), iso.uid, -1)
            proc = subprocess.Popen([*iso.prefix, iso.python, "-I", "-S", str(program)], cwd=tmp,
                                    env=_clean_env(tmp), stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr,
                                    start_new_session=True, preexec_fn=functools.partial(_set_limits, limits))
            try:
                code = proc.wait(timeout=limits.wall_s)
                status = "passed" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                code, status = None, "timeout"
            finally:
                _kill_group(proc)
        seconds = time.perf_counter() - start
        return Outcome(status, code, _read(out, limits.output_bytes), _read(err, limits.output_bytes), seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group: with a PID namespace, the namespace's init dies with it and the
    kernel kills every process left inside."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
