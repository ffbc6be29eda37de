"""A real headless Chromium for the page tests, driven over the Chrome DevTools Protocol (a websocket):
open a local file with the network cut off, collect console errors, uncaught exceptions and any request
that left the machine, evaluate JavaScript in the page, and take a full-page screenshot.

Chromium is Debian's `chromium` package (`apt-get install -y chromium`; the README's test setup installs
it). Tests call `chromium_or_skip()` so that a machine without it skips them with that reason.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from servers import stop

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
START_TIMEOUT_S = 60
LOAD_TIMEOUT_S = 60


def chromium_or_skip() -> str:
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on this machine (apt-get install -y chromium)")


@dataclass
class PageVisit:
    """What happened while a page loaded and ran."""

    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


class DevTools:
    """One page target's websocket: numbered commands, events kept in order."""

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self.socket = connect(url, max_size=None, open_timeout=START_TIMEOUT_S)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=LOAD_TIMEOUT_S))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(message)
            if message.get("method") == method:
                return message
        raise TimeoutError(f"no {method} within {LOAD_TIMEOUT_S} s")

    def close(self) -> None:
        self.socket.close()


@contextlib.contextmanager
def chromium() -> Iterator[DevTools]:
    """A fresh headless Chromium (own profile, no sandbox: tests may run as root) and its first page."""
    binary = chromium_or_skip()
    with tempfile.TemporaryDirectory(prefix="dlpipe-chromium-") as profile:
        process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-extensions",
                "--no-first-run",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            port = _devtools_port(process)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                targets = json.load(answer)
            page = next(t for t in targets if t.get("type") == "page")
            tools = DevTools(page["webSocketDebuggerUrl"])
            try:
                yield tools
            finally:
                tools.close()
        finally:
            stop(process, timeout=10)


def _devtools_port(process: subprocess.Popen) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if match := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
            return int(match[1])
    raise RuntimeError("Chromium did not start: " + "".join(seen[-20:]))


def visit(page: Path, expressions: dict[str, str], screenshot: Path | None = None, width: int = 1400) -> PageVisit:
    """Open `page` from disk, wait for its load event and a moment of scripts, evaluate each JavaScript
    expression (its JSON-able value lands in `values`), and optionally save a full-page PNG screenshot."""
    visit = PageVisit()
    with chromium() as tools:
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.send(f"{domain}.enable")
        tools.send("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
        tools.send("Page.navigate", url=page.resolve().as_uri())
        tools.wait_for("Page.loadEventFired")
        time.sleep(1.0)  # scripts that render after load (e.g. plot libraries)
        for name, expression in expressions.items():
            result = tools.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
            if "exceptionDetails" in result:
                raise RuntimeError(f"{name}: {result['exceptionDetails']}")
            visit.values[name] = result["result"].get("value")
        if screenshot is not None:
            height = tools.send(
                "Runtime.evaluate", expression="document.documentElement.scrollHeight", returnByValue=True
            )
            full = int(height["result"]["value"])
            tools.send(
                "Emulation.setDeviceMetricsOverride", width=width, height=full, deviceScaleFactor=1, mobile=False
            )
            shot = tools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        for event in tools.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                visit.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                visit.console_errors.append(params["entry"].get("text", ""))
            elif method == "Runtime.exceptionThrown":
                visit.exceptions.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                if not url.startswith(("file:", "data:", "about:", "blob:")):
                    visit.external_requests.append(url)
    return visit
