"""The built distribution ships the whole source: every module of engine/, server/ and clients/, the playground's
files and the shipped FAM adapters land in the wheel under famserve/ (an editable install hides a package missing
from pyproject.toml; the Docker image, which installs the wheel, does not)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from deploy_files import REPO

FOLDERS = {"engine": "famserve/engine", "server": "famserve/server", "clients": "famserve/clients"}


def test_wheel_holds_every_module_the_playground_and_the_shipped_adapters(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a clean copy: setuptools would reuse a stale build/ folder in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", *FOLDERS):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("famserve-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{target}/{path.relative_to(REPO / folder).as_posix()}"
                for folder, target in FOLDERS.items()
                for path in (REPO / folder).rglob("*")
                if path.is_file() and (path.suffix == ".py" or "playground" in path.parts or "adapters" in path.parts)
                and "__pycache__" not in path.parts}
    assert expected - shipped == set()
