"""Memory does not grow with shard size: one shard of 1,000 and one of 10,000 synthetic images through
ingest and pseudo-label (grounded generator with tiny random models: the streaming, chunking and spooling
are the same for both generators), each stage in a fresh process, peak RSS recorded for both sizes.

Marked slow: synthesising and processing 11,000 images takes about 15 minutes on 2 cores."""

import json
import subprocess
import sys

import pytest

from ovtasks.core.config import load_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]

# The stage's own peak: imports first, then the kernel's high-water mark is reset (clear_refs 5) so the
# import-time peak (the same in every process) does not hide what the stage itself uses.
_STAGE = """
import json, sys, time
from ovtasks.core.config import load_settings
from ovtasks.ingest.pipeline import ingest
from ovtasks.pseudolabel.runner import pseudo_label

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

stage, src, out, env = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
s = load_settings(env=env)
baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
if stage == "ingest":
    r = ingest(src, out, s, workers=1).report
    counts = {"seen": r["seen"], "kept": r["kept"]}
else:
    r = pseudo_label(src, out, s, "grounded").report
    counts = {"images": r["images"], "annotations": r["annotations"]}
print(json.dumps({"peak_rss_mib": status("VmHWM"), "rss_after_imports_mib": baseline,
                  "seconds": time.perf_counter() - t0, **counts}))
"""


def _run(stage, src, out, env):
    r = subprocess.run([sys.executable, "-c", _STAGE, stage, str(src), str(out), json.dumps(env)], capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_rss_flat_from_1k_to_10k_images(tiny_grounded, tmp_path, record_fault):
    from ovtasks.data.synth import SynthSpec, generate

    env = {"OVTASKS_GROUNDED__GDINO_MODEL": tiny_grounded[0], "OVTASKS_GROUNDED__SAM_MODEL": tiny_grounded[1],
           "OVTASKS_DATA_DIR": str(tmp_path / "data")}
    res = {}
    for n in (1000, 10000):
        raw = tmp_path / f"raw{n}"
        generate(SynthSpec(seed=3, shards=1, images_per_shard=n, image_size=128, failure_rate=0.05), str(raw), load_settings(env={}))
        res[n] = {"ingest": _run("ingest", raw, tmp_path / f"clean{n}", env)}
        res[n]["pseudo_label"] = _run("pseudo_label", tmp_path / f"clean{n}", tmp_path / f"out{n}", env)
        assert res[n]["pseudo_label"]["images"] == res[n]["ingest"]["kept"]
    (tmp_path / "memory.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    for stage in ("ingest", "pseudo_label"):
        small, big = res[1000][stage]["peak_rss_mib"], res[10000][stage]["peak_rss_mib"]
        assert big - small < max(40.0, 0.1 * small), f"{stage}: peak RSS {small:.0f} MiB at 1k, {big:.0f} MiB at 10k"
    record_fault("memory on a 10x larger shard",
                 "one shard of 1,000 and one of 10,000 images through ingest and pseudo-label (separate processes)",
                 "; ".join(f"{stage} peak RSS {res[1000][stage]['peak_rss_mib']:.0f} MiB at 1k vs {res[10000][stage]['peak_rss_mib']:.0f} MiB at 10k "
                           f"({res[1000][stage]['seconds']:.0f} s / {res[10000][stage]['seconds']:.0f} s)" for stage in ("ingest", "pseudo_label")), 0)
