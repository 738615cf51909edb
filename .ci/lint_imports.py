"""Check pyproject's import-linter contracts on dflow as it is installed.

``plugins/``, ``dashboards/`` and ``configs/`` are installed as
``dflow.plugins``, ``dflow.dashboards`` and ``dflow.configs`` (pyproject's
``package-dir``), which import-linter cannot see in the checkout: the
contracts are checked on a copy laid out as installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

root = Path(__file__).resolve().parents[1]
pyproject = root / "pyproject.toml"
layout = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
with tempfile.TemporaryDirectory() as tree:
    # parents first: "dflow" before "dflow.plugins"
    for package, folder in sorted(layout.items()):
        shutil.copytree(
            root / folder,
            Path(tree, *package.split(".")),
            ignore=shutil.ignore_patterns("__pycache__"),
            dirs_exist_ok=True,
        )
    # run with the venv's python (make lint): its lint-imports sits beside it
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": tree}
    sys.exit(subprocess.call([lint, str(pyproject)], cwd=tree, env=env))
