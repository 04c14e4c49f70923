"""The wheel installs everything under `pagedkv.` and nothing generic at the top level.

HF's own `kernels` package exists and transformers probes for it: a stray top-level `kernels`
(or `kvcache`, `integrations`) in site-packages would shadow it.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("pagedkv-*.whl")
    return zipfile.ZipFile(path)


def test_everything_lands_under_pagedkv(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"pagedkv"}


def test_the_three_packages_are_complete(wheel):
    names = set(wheel.namelist())
    for package in ("kvcache", "kernels", "integrations"):
        sources = {p.name for p in (ROOT / package).glob("*.py")}
        shipped = {n.split("/")[-1] for n in names if n.startswith(f"pagedkv/{package}/")}
        assert sources <= shipped, f"{package}: missing {sorted(sources - shipped)}"
