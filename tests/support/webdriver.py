"""A minimal W3C WebDriver client for chromedriver (no selenium dependency): sessions, navigation,
cookies, element lookup, clicks, text and screenshots. Debian `chromium` + `chromium-driver`."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.seaweed import free_port

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def find_browser() -> tuple[str | None, str | None]:
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


class WebDriverError(RuntimeError):
    pass


class Chrome:
    def __init__(self, browser: str, driver: str, log: Path):
        port = free_port()
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except OSError:
                time.sleep(0.2)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": browser, "args": ["--headless=new", "--no-sandbox", "--disable-background-networking",
                                        "--disable-dev-shm-usage", "--window-size=1400,1000"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        req = urllib.request.Request(self.base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                value = json.loads(r.read())["value"]
                if isinstance(value, dict) and "error" in value:
                    raise WebDriverError(f"{value['error']}: {value.get('message', '')[:500]}")
                return value
        except urllib.error.HTTPError as exc:
            raise WebDriverError(exc.read().decode(errors="replace")[:2000]) from exc

    def s(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body if body is not None or method == "GET" else {})

    def get(self, url: str) -> None:
        self.s("POST", "/url", {"url": url})

    def add_cookie(self, name: str, value: str) -> None:
        self.s("POST", "/cookie", {"cookie": {"name": name, "value": value, "path": "/"}})

    def find(self, css: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]
            except WebDriverError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.s("POST", "/elements", {"using": "css selector", "value": css})]

    def click(self, element: str) -> None:
        self.s("POST", f"/element/{element}/click")

    def text(self, element: str) -> str:
        return self.s("GET", f"/element/{element}/text")

    def execute(self, script: str, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.execute(script)
            if v:
                return v
            time.sleep(0.25)
        raise TimeoutError(f"never true: {script}")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.s("GET", "/screenshot")))
        return path

    def quit(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        self.proc.terminate()
        self.proc.wait(timeout=30)
