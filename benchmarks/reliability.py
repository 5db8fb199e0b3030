"""Runs the fault-injection and security tests and writes benchmarks/reliability.md: each fault, what was
injected, what happened, data lost. The records come from the tests themselves (the ``record_fault``
fixture); pass/fail from pytest's JUnit XML. A test that failed, or never recorded, is listed as such.

    .venv/bin/python benchmarks/reliability.py            # default-suite faults (~6 min on 2 cores)
    .venv/bin/python benchmarks/reliability.py --slow     # + the 1k vs 10k images memory test (~15 min more)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAULT_TESTS = ["tests/system/faults", "tests/system/dags/test_celery_integration.py"]
# security properties proven by tests elsewhere in the suite (they pass or fail here too)
SECURITY_TESTS = {
    "tests/unit/ingest/test_bad_inputs.py::test_path_traversal_and_links_never_extracted": "tar members with `..`, absolute paths and symlinks are quarantined, never extracted",
    "tests/unit/core/test_storage.py": "store keys cannot escape their root (`..`, absolute paths, backslashes, symlinks out)",
    "tests/unit/ingest/test_bad_inputs.py::test_oversized_image_not_read": "an oversized image member is skipped unread",
    "tests/unit/ingest/test_bad_inputs.py::test_rejected_kinds": "bad kinds incl. decompression bombs and oversized captions are quarantined with a reason, bounded before allocation",
    "tests/unit/deploy/test_deploy_files.py": "compose refuses to start without secrets (`${VAR:?}`); helm values without existing Secrets are refused by the schema",
    "tests/unit/ui/test_plugin_api.py::test_anonymous_and_bad_tokens_are_refused": "every plugin endpoint refuses anonymous, forged and invalid tokens",
    "tests/unit/ui/test_plugin_api.py::test_promote_needs_admin_and_runs_the_gate": "promotion refused to viewer and op roles",
    "tests/unit/core/test_config.py": "no credential has a default; secrets are masked, read from *_FILE and taken verbatim (never YAML-parsed); YAML errors never echo the line",
    "tests/unit/ingest/test_hostile_ingest.py": "hand-built hostile shards (zero-length PAX record, negative / malformed sizes, 20 KB PAX and long-name headers, "
                                    "5000-char names, a multi-page TIFF with an empty page, a failing re-encode, metadata that bypassed the filters, "
                                    "integer parquet keys, a failed re-ingest, a trailing-newline shard name, 2000 rows without samples, colliding "
                                    "image ids, a SIGKILLed run's scratch): each run ends, every sample is accounted for, the good ones are kept",
    "tests/unit/ingest/test_fuzz_ingest.py": "structure-aware fuzzer (Hypothesis, seeded; `make fuzz` for thousands of examples): damaged shards never hang the "
                  "reader or ingest, memory stays bounded, seen == kept + quarantined, kept images decode as RGB, nothing is written outside --out",
    "tests/unit/cli/test_cli_errors.py": "each subcommand against bad arguments (missing / wrong paths, a file as a store, unwritable output, unreachable S3, "
                                "bad config): one line and exit 2, never a traceback; a closed pipe ends quietly",
    "tests/unit/ui/test_hostile_ui.py": "script in manifest counts, manifests that are not objects, generator=../x, keys with '/', a checksum of '/../..', "
                                   "a quote in the model name: numbers only on the page, 422 / 404, no path escapes; no unauthenticated schema",
    "tests/unit/models/test_hub.py::test_object_names_never_escape_the_model_cache": "a store model with an object named ../../x is refused, nothing written outside the cache",
    "tests/unit/validate/test_validate.py::test_a_shard_that_does_not_match_its_manifest_fails_and_training_rechecks":
        "pseudo-label JSON edited after its manifest, and a relabel landing between validation and training: the shard is left out",
}


def run(slow: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ovtasks-reliability-"))
    junit = out / "junit.xml"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *FAULT_TESTS, *SECURITY_TESTS]
    if slow:
        args += ["-m", "not gpu"]  # the default addopts exclude slow; this includes it
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "TEST_OUT": str(out), "HF_HUB_OFFLINE": "1"}, text=True,
                          capture_output=True)
    seconds = time.perf_counter() - t0
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
        state = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        results[name] = {"state": state, "seconds": float(case.get("time", 0))}
    records = {}
    for f in sorted((out / "reliability").glob("*.json")) if (out / "reliability").exists() else []:
        r = json.loads(f.read_text())
        records[r["test"]] = r
    return {"results": results, "records": records, "seconds": seconds, "exit": proc.returncode,
            "tail": (proc.stdout + proc.stderr)[-2000:]}


def render(r: dict) -> str:
    lines = ["# Reliability report", "",
             f"Generated by `benchmarks/reliability.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; pytest exit {r['exit']}, "
             f"{r['seconds']:.0f} s.", ""]
    recorded = r["records"]
    lost = sum(x["data_lost"] for x in recorded.values())
    fault_cases = {k: v for k, v in r["results"].items() if k.startswith(("tests/system/faults", "tests/system/dags/test_celery"))}
    passed = sum(1 for v in fault_cases.values() if v["state"] == "passed")
    lines += ["## Summary", "",
              f"**{passed}/{len(fault_cases)} fault-injection tests passed; data lost across all of them: {lost}.** "
              f"Security checks: {sum(1 for k, v in r['results'].items() if not k.startswith(('tests/system/faults', 'tests/system/dags')) and v['state'] == 'passed')} "
              f"passed, {sum(1 for k, v in r['results'].items() if not k.startswith(('tests/system/faults', 'tests/system/dags')) and v['state'] != 'passed')} not.", "",
              "## Faults", "", "| fault | injected | what happened | data lost | test |", "|---|---|---|---:|---|"]
    for test, res in sorted(fault_cases.items()):
        rec = recorded.get(test)
        if rec:
            lines.append(f"| {rec['fault']} | {rec['injected']} | {rec['outcome']} | {rec['data_lost']} | `{test}` ({res['state']}, {res['seconds']:.0f} s) |")
        else:
            lines.append(f"| — | — | **{res['state']}**, no record written | ? | `{test}` |")
    lines += ["", "## Security checks", "", "| property | tests | result |", "|---|---|---|"]
    for target, what in SECURITY_TESTS.items():
        cases = {k: v for k, v in r["results"].items() if k == target or k.startswith((target + "::", target + "["))}
        states = {v["state"] for v in cases.values()}
        result = "not run" if not cases else ("passed" if states == {"passed"} else ", ".join(sorted(states)))
        lines.append(f"| {what} | `{target}` ({len(cases)}) | {result} |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slow", action="store_true", help="include the slow memory test (1k vs 10k images)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "reliability.md"))
    args = p.parse_args()
    r = run(args.slow)
    Path(args.out).write_text(render(r))
    print(Path(args.out).read_text())
    if r["exit"] not in (0,):
        print(r["tail"], file=sys.stderr)
    return r["exit"]


if __name__ == "__main__":
    sys.exit(main())
