"""Fault-injection tests record what they injected and what happened; `benchmarks/reliability.py` runs
them and turns the records into benchmarks/reliability.md."""

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def record_fault(request):
    def record(fault: str, injected: str, outcome: str, data_lost: int) -> None:
        out = Path(os.environ.get("TEST_OUT", ROOT / "test-output")) / "reliability"
        out.mkdir(parents=True, exist_ok=True)
        entry = {"test": request.node.nodeid, "fault": fault, "injected": injected, "outcome": outcome, "data_lost": data_lost}
        (out / f"{request.node.name}.json").write_text(json.dumps(entry, indent=2))

    return record
