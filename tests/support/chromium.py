"""Headless Chromium for tests: load a page, wait for a condition, read console errors, take a screenshot.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: commands on fd 3, replies
on fd 4, NUL-separated JSON), so no port, no websocket library and no race for a free port; the protocol
reports console errors, uncaught exceptions and failed loads as events, which is sturdier than scraping
`--enable-logging` output. Every request the page makes is recorded, so a test can assert that nothing left
the machine.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe")


def chromium_executable() -> str | None:
    """Debian's `chromium` (or a Chrome) on PATH, else None."""
    return next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)


_TRAMPOLINE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
               "os.execv(sys.argv[3], sys.argv[3:])")


def _above_4(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 5)
    os.close(fd)
    return high


class Chromium:
    """One headless browser with one page. Use as a context manager."""

    def __init__(self, profile: Path, *, executable: str | None = None, timeout: float = 60.0):
        executable = executable or chromium_executable()
        if executable is None:
            raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
        self.timeout = timeout
        self.errors: list[str] = []  # console errors, uncaught exceptions, failed loads
        self.requests: list[str] = []  # every URL the page asked for
        self._events: list[dict[str, Any]] = []
        self._buffer, self._next_id = b"", 0
        cmd_read, self._cmd = os.pipe()
        self._reply, reply_write = os.pipe()
        # a tiny Python trampoline puts the pipe ends on the fds Chromium expects (3: commands in, 4: replies out)
        # and execs it; they are first moved above 4, so neither dup2 can overwrite the other's source
        cmd_read, reply_write = (_above_4(fd) for fd in (cmd_read, reply_write))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _TRAMPOLINE, str(cmd_read), str(reply_write), executable, *FLAGS,
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(cmd_read, reply_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_read)
        os.close(reply_write)
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    # ------------------------------------------------------------------------------------------ page
    def load(self, url: str, *, width: int = 1280, height: int = 900) -> None:
        """Navigate and wait for the load event (every image and script of the page)."""
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self._events):
            self._take_event(deadline)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (promises are awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float | None = None) -> Any:
        """Poll until `expression` is truthy; returns its value, raises TimeoutError."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout or self.timeout:.0f} s")
            time.sleep(0.2)
        return value

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    # -------------------------------------------------------------------------------------- protocol
    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A command to the page's session."""
        return self._call(method, params, session=self._session)

    def _call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
              ) -> dict[str, Any]:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {},
                   **({"sessionId": session} if session else {})}
        os.write(self._cmd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._record(reply)

    def _take_event(self, deadline: float) -> None:
        self._record(self._receive(deadline))

    def _record(self, event: dict[str, Any]) -> None:
        self._events.append(event)
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in
                                                      params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".rstrip())
        elif method == "Network.requestWillBeSent":
            self.requests.append(params.get("request", {}).get("url", ""))

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._reply], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._reply, 1 << 20)
            if not chunk:
                raise EOFError("chromium exited")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    # ------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        try:
            self._call("Browser.close")
        except (OSError, EOFError, TimeoutError, RuntimeError):
            self._proc.kill()
        finally:
            self._proc.wait(timeout=30)
            os.close(self._cmd)
            os.close(self._reply)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
