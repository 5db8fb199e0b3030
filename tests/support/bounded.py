"""Run a call in a thread that must finish within a time bound: a hang fails the test instead of the suite."""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def call_within(fn: Callable[[], T], seconds: float, what: str = "the call") -> T:
    out: dict = {}

    def go():
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{what} still running after {seconds} s (a hang)"
    if "error" in out:
        raise out["error"]
    return out["result"]
