"""What a benchmark ran on: the dflow revision and the machine, for its results."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import dask
import distributed

import dflow


def revision() -> str:
    """The commit of the dflow imported, ``+dirty`` if its tracked files differ:
    what a benchmark measured."""
    here = Path(dflow.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True
        ).stdout.strip()

    parts = (".", "../plugins", "../configs", "../dashboards")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *parts)
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{commit}{'+dirty' if dirty else ''} ({here})"


def machine() -> dict[str, Any]:
    """The host, its load average at the call, the library versions (torch's if
    it is imported) and :func:`revision`."""
    versions = {"dask": dask.__version__, "distributed": distributed.__version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = torch.__version__
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
        "revision": revision(),
        "loadavg_start": list(os.getloadavg()),
    }
