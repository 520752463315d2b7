"""Run untrusted Python (model-written code) in a separate, limited process.

One call = one fresh process, started from an empty environment in its own temporary directory,
under CPU, memory, process-count and file-size rlimits and a wall-time limit; its network is cut
where the OS allows (a new network namespace through util-linux `unshare`; Python 3.11 has no
`os.unshare`), and under root it first drops to an unprivileged user, since root ignores the
process-count limit. Its output goes to two unnamed files the evaluator opened itself and reads back
through its own handles: the child owns its temp dir and may replace anything in it (a FIFO, a symlink to
program.py or /proc/self/environ), so nothing there is ever reopened by path. Without a usable `unshare`
the fallback is much weaker, and each evaluation says so in one warning. docs/sandbox.md states exactly
what this does and does not guarantee.

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
UNSHARE = "unshare"   # util-linux; when it cannot start a child, the fallback of `_candidates` is used


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
    why: str = ""             # why the stronger ways failed (set when the fallback is in force)


def require_opt_in() -> None:
    if os.environ.get(ALLOW_ENV) != "1":
        raise AmrlhfError(
            "refusing to execute model-written code: set `allow_code_execution: true` in the evaluation suite "
            f"(or {ALLOW_ENV}=1 for a direct lm-eval run); it then runs in the sandbox of docs/sandbox.md")


def _drop_argv(uid: int, gid: int) -> tuple[str, ...]:
    return ("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs", "--")


def _candidates() -> list[tuple[tuple[str, ...], bool, str, int | None]]:
    """Ways to start the child, strongest first: (argv prefix, network cut, user, uid)."""
    net = (UNSHARE, "--net", "--pid", "--fork", "--kill-child")
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
                return Isolation(tuple(prefix), python, net, user, uid, "; ".join(tried))
            tried.append(f"{' '.join(argv[:3])}...: {proc.stderr.strip()[-200:]}")
    raise AmrlhfError("no way to start a sandboxed child here: " + " | ".join(tried))


_announced = False  # set by the first announce() of this process


def announce() -> Isolation:
    """At the start of each evaluation that may run model code (and at the first run of a process that no
    evaluation announced, e.g. a plain `lm-eval` run): probe the isolation and, where the fallback without
    `unshare` is in force, log ONE warning line saying what the child can then do."""
    global _announced
    iso = isolation()
    _announced = True
    if not iso.network_cut:
        log.warning("code sandbox: no usable `unshare` (%s), so model-written code runs as %s with NO network "
                    "cut and NO PID namespace: it can write wherever %s can (for a non-root user: home, "
                    "repository, checkpoints) and a double fork + setsid escapes the kill (docs/sandbox.md)",
                    iso.why or "?", iso.user, iso.user)
    return iso


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


def _read(fh, limit: int) -> str:
    """Through the evaluator's own handle (the child shared its offset: rewind first)."""
    fh.seek(0)
    return fh.read(limit).decode("utf-8", errors="replace")


def _remove(tmp: Path) -> None:
    """Remove the child's temp dir whatever it left there: FIFOs, sockets and symlinks are unlinked, never
    opened or followed (rmtree); read-only or mode-000 folders of a non-root child are made writable first."""
    for _ in range(3):
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.lexists(tmp):
            return
        _unlock(tmp)
    log.warning("code sandbox: could not remove the temp dir %s", tmp)


def _unlock(tmp: Path) -> None:
    """chmod 700 every folder under `tmp` (a non-root child's own, so ours too), not following a symlink (that
    raises NotImplementedError). Root ignores the modes: nothing to do, and nothing chmod-ed as root."""
    if os.geteuid() == 0:
        return
    try:
        os.chmod(tmp, 0o700, follow_symlinks=False)
    except (OSError, NotImplementedError):
        return
    for root, dirs, _ in os.walk(tmp):  # top-down: each folder is unlocked before walk enters it
        for name in dirs:
            try:
                os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass


def run_python(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a Python program in the sandbox; -> Outcome. Refuses without the opt-in."""
    require_opt_in()
    iso = isolation() if _announced else announce()
    tmp = Path(tempfile.mkdtemp(prefix="amrlhf-sandbox-"))
    try:
        program = tmp / "program.py"
        program.write_text(source, encoding="utf-8")
        if iso.uid is not None:
            for p in (tmp, program):
                os.chown(p, iso.uid, -1)
        start = time.perf_counter()
        # unnamed files outside the temp dir: the child writes them through the inherited descriptors only
        with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
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
            return Outcome(status, code, _read(fout, limits.output_bytes), _read(ferr, limits.output_bytes),
                           seconds)
    finally:
        _remove(tmp)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group: with a PID namespace, the namespace's init dies with it and the
    kernel kills every process left inside."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
