"""What can be checked here of docker/ without a Docker engine: the Dockerfile lints clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (pip install {name}-bin)")
    return found


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "docker").glob("Dockerfile*")), ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    res = subprocess.run([_tool("hadolint"), "--config", str(ROOT / "docker" / ".hadolint.yaml"), str(dockerfile)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_installs_pinned_set():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "-c constraints.txt" in text and "USER 50000" in text
