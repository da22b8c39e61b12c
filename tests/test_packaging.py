"""The wheel: knowedit with its kernels, CLI and recipes (configs included) as
subpackages, the `knowedit` entry point, and no stray top-level packages."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "knowedit", "kernels", "cli", "recipes"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the sources (the build writes build/ and egg-info)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(src),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (whl,) = dist.glob("knowedit-*.whl")
    return whl


def _names(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def test_wheel_has_no_stray_top_level_packages(wheel: Path) -> None:
    names = _names(wheel)
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"knowedit"}
    for sub in ("kernels", "cli", "recipes"):
        assert f"knowedit/{sub}/__init__.py" in names
        assert not any(n.startswith(f"{sub}/") for n in names)
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level:
        with zipfile.ZipFile(wheel) as z:
            assert z.read(top_level).decode().split() == ["knowedit"]


def test_wheel_ships_every_recipe(wheel: Path) -> None:
    names = set(_names(wheel))
    configs = REPO / "recipes" / "configs"
    shipped = sorted(configs.rglob("*.yaml"))
    assert shipped
    for path in shipped:
        assert f"knowedit/recipes/configs/{path.relative_to(configs).as_posix()}" in names


def test_wheel_entry_point(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        (ep,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(z.read(ep).decode())
    assert parser["console_scripts"]["knowedit"].strip() == "knowedit.cli.app:main"


def test_installed_wheel_imports(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "-q",
        "--target",
        str(site),
        str(wheel),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    probe = textwrap.dedent(
        f"""
        import sys
        from importlib.resources import files
        from pathlib import Path

        import knowedit, knowedit.kernels, knowedit.cli, knowedit.recipes
        import knowedit.cli.app, knowedit.recipes.train
        site = Path({str(site)!r}).resolve()
        for mod in (knowedit, knowedit.kernels, knowedit.cli, knowedit.recipes):
            assert site in Path(mod.__file__).resolve().parents, (mod.__name__, mod.__file__)
        assert (files("knowedit.recipes") / "configs" / "small.yaml").is_file()
        from knowedit.cli.model import config_path
        assert site in config_path("small").resolve().parents
        for name in ("kernels", "cli", "recipes"):
            assert name not in sys.modules, name
        print("ok")
        """
    )
    run_env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=run_env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")
