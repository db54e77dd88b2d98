"""Running the real `wsip` from tests, fast, and on storage that misbehaves (docs/reliability.md).

`run_wsip` starts a fresh interpreter per run. `ForkedWsip` forks each run from one server interpreter that
imported torch, timm, sklearn and the stages once: every run is still its own process with its own arguments,
folder, environment and output, exiting (or killed) as `wsip` does, but it costs its work rather than a 3-8 s
import. With `private_mounts` the server lives in a private mount namespace (`unshare -m`, root only):
`mounted(...)` there (a workspace bind-mounted read-only, a small tmpfs) is seen by every run and shell
command it forks, by nothing outside, and nothing stays mounted once the server exits.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from wsi_pipeline.faults import FAULT_AT_ENV, FAULT_LOG_ENV

WSIP = [sys.executable, "-m", "wsi_pipeline.cli"]
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

# Reads one JSON request per line and answers one line each: {"wait": pid} → the child's exit code (negative:
# the signal that killed it); a job ({"args" | "shell", "cwd", "env", "log"}) → the pid of a forked child that
# runs `wsip ARGS` (or `sh -c SHELL`) with its output in "log".
_FORK_SERVER = r"""
import json, os, sys, traceback
import matplotlib, timm, zarr  # everything heavy, imported once
import wsi_pipeline.cli as cli
import wsi_pipeline.stages.predict, wsi_pipeline.stages.train
matplotlib.use("Agg")
import matplotlib.pyplot
for line in sys.stdin:
    job = json.loads(line)
    if "wait" in job:
        print(os.waitstatus_to_exitcode(os.waitpid(job["wait"], 0)[1]), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            if "shell" in job:
                os.execvp("sh", ["sh", "-c", job["shell"]])
            sys.argv = ["wsip", *job["args"]]
            try:
                cli.app()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
"""


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a test's `wsip`: this very `wsi_pipeline` (whatever the folder), no inherited fault
    variables, workspace or terminal size (pytest-xdist workers set COLUMNS=80, which would fix the width of
    the fork server's consoles for every run), one torch thread (resumed and uninterrupted training then
    compute identically, and nothing oversubscribes a small box)."""
    inherited = (FAULT_AT_ENV, FAULT_LOG_ENV, "WSIP_OUT", "COLUMNS", "LINES")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def run_wsip(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`wsip ARGS` in a fresh interpreter."""
    return subprocess.run([*WSIP, *map(str, args)], cwd=cwd, env=cli_env(**env), capture_output=True, text=True,
                          timeout=600)


class ForkedWsip:
    """Runs `wsip` (and, inside a namespace, shell commands) forked from one server; see the module docstring."""

    def __init__(self, *, private_mounts: bool = False) -> None:
        command = [sys.executable, "-c", _FORK_SERVER]
        if private_mounts:
            command = ["unshare", "-m", *command]
        self.server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       env=cli_env())

    def __call__(self, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
        """`wsip ARGS` in `cwd`, with `env` added to the test environment; stdout and stderr in `.stderr`."""
        return self.start(args, cwd, **env).wait()

    def start(self, args: list[str], cwd: Path, **env: str) -> Running:
        """Start `wsip ARGS` and return at once (runs started so run concurrently)."""
        return self._start({"args": list(map(str, args))}, args, cwd, env)

    def shell(self, command: str, cwd: Path) -> subprocess.CompletedProcess:
        """`sh -c COMMAND` where the server's runs are (inside its namespace, if any)."""
        return self._start({"shell": command}, command, cwd, {}).wait()

    @contextlib.contextmanager
    def mounted(self, mount: str, path: Path) -> Iterator[None]:
        """`mount` (`read_only(path)` or `tmpfs(path, size)`) for the block, for this server's runs only."""
        done = self.shell(mount, path.parent)
        if done.returncode != 0:
            raise RuntimeError(f"{mount}: {done.stderr.strip()}")
        try:
            yield
        finally:
            self.shell(f"umount {shlex.quote(str(path))}", path.parent)

    def _start(self, job: dict, args: object, cwd: Path, env: dict[str, str]) -> Running:
        with tempfile.NamedTemporaryFile(prefix="wsip-run-", suffix=".txt", delete=False) as f:
            log = Path(f.name)
        pid = self._ask({**job, "cwd": str(cwd), "env": cli_env(**env), "log": str(log)})
        return Running(self, pid, args, log)

    def _ask(self, request: dict) -> int:
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        if not answer:
            raise RuntimeError("the wsip fork server stopped (in a namespace: is this root?)")
        return int(answer)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)

    def __enter__(self) -> ForkedWsip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Running:
    """A run started by `ForkedWsip.start`."""

    def __init__(self, server: ForkedWsip, pid: int, args: object, log: Path) -> None:
        self.server, self.pid, self.args, self.log = server, pid, args, log

    def wait(self) -> subprocess.CompletedProcess:
        """Its exit code (negative: killed by that signal), with stdout and stderr together in `.stderr`."""
        try:
            code = self.server._ask({"wait": self.pid})
            return subprocess.CompletedProcess(self.args, code, "", self.log.read_text(errors="replace"))
        finally:
            self.log.unlink(missing_ok=True)


@contextlib.contextmanager
def read_only_workspace(wsip: ForkedWsip, ws: Path) -> Iterator[None]:
    """`ws` read-only for `wsip`'s runs: bind-mounted read-only in its namespace (root), else `chmod -R a-w`
    for the block (another user; root ignores permissions, hence `can_make_read_only`)."""
    if namespaces_available():
        with wsip.mounted(read_only(ws), ws):
            yield
        return
    subprocess.run(["chmod", "-R", "a-w", str(ws)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(ws)], check=True)


def can_make_read_only() -> bool:
    return namespaces_available() or os.geteuid() != 0


def read_only(path: Path) -> str:
    """A mount command: `path` bind-mounted onto itself, read-only (even root cannot write there)."""
    q = shlex.quote(str(path))
    return f"mount --bind {q} {q} && mount -o remount,ro,bind {q}"


def tmpfs(path: Path, size_kib: int) -> str:
    """A mount command: a tmpfs of `size_kib` KiB on `path` (a disk that fills up)."""
    return f"mount -t tmpfs -o size={size_kib}k tmpfs {shlex.quote(str(path))}"


@functools.cache
def namespaces_available() -> bool:
    """Whether this process may make a private mount namespace and mount in it (root, unshare)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            probe = subprocess.run(["unshare", "-m", "sh", "-c", tmpfs(Path(folder), 64)], capture_output=True,
                                   timeout=30)
        except (OSError, subprocess.SubprocessError):
            return False
    return probe.returncode == 0
