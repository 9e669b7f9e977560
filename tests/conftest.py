"""Shared test set-up: the data mirror, configs composed for tiny models, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIRROR = ROOT.parent / "shared" / "data" / "hub"

# The same code path that reads the Hub reads this local mirror.
if "GEM_BENCH_DATA" not in os.environ and MIRROR.is_dir():
    os.environ["GEM_BENCH_DATA"] = str(MIRROR)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose(*overrides: str):
    """The run config for ``overrides`` (Hydra's compose API), as the CLI would build it."""
    from gem_bench.cli import compose as cli_compose

    return cli_compose(list(overrides))


def tiny(results_dir: Path, *overrides: str) -> list[str]:
    """Overrides for a seconds-long run on a tiny random model."""
    return ["model=tiny-llama", "profile=tiny", f"results_dir={results_dir}", *overrides]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """``gem-bench <args>`` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gem_bench.cli", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def mirror() -> Path:
    if not MIRROR.is_dir():
        pytest.skip(f"the data mirror {MIRROR} is not here")
    return MIRROR
