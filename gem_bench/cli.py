"""Entry points only.

    gem-bench model=smollm2-135m task=sst2 method=gem seed=28      one run
    gem-bench -m +experiment=table3_cpu                           a sweep (Hydra multirun)
    gem-bench params model=opt-1.3b method=lora                   trainable share, offline
    gem-bench params --table                                      the same for every model x method
    gem-bench report --experiment table3_cpu                      tables and figures from records
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gem_bench.config import register_configs
from gem_bench.errors import GemBenchError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
EXIT_PREEMPTED = 3  # the run stopped on SIGTERM/SIGUSR2 after a checkpoint; not a failure

register_configs()


def _fail(exc: Exception) -> None:
    print(f"gem-bench: error: {exc}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _run(cfg: DictConfig) -> float | None:
    from gem_bench import train
    from gem_bench.records import RunBusy

    choice = HydraConfig.get().runtime.choices.get("method", cfg.method.name)
    _join_slurm_tasks()
    try:
        record = train.run(cfg, choice)
    except RunBusy as exc:  # another sweep owns this cell: it runs once, there
        print(f"[gem-bench] skipped: {exc}")
        return None
    except train.Preempted as exc:  # checkpointed: a requeued job (or the same command) resumes it
        print(f"[gem-bench] preempted: {exc}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except GemBenchError as exc:
        _fail(exc)
    if record and record.get("status") == "finished":
        return record["metrics"]["test"].get(cfg.task.metric)
    return None


def _join_slurm_tasks() -> None:
    """A Slurm job of several tasks (``hydra.launcher.tasks_per_node=<GPUs>``) runs this job in one
    process per task: submitit exports the torch.distributed variables (rank, world size, master
    address) so that Accelerate makes them one data-parallel run."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def compose(overrides: list[str]) -> DictConfig:
    """The run config for ``overrides`` without running anything (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def params_main(argv: list[str]) -> None:
    from gem_bench.params import table, trainable_share

    if argv == ["--table"]:  # every model x Table 3 method, as the README shows it
        print(table(compose))
        return
    try:
        cfg = compose(argv)
        share = trainable_share(cfg.model, cfg.method)
    except GemBenchError as exc:
        _fail(exc)
    print(
        f"model={cfg.model.name} method={cfg.method.name} trainable={share['trainable']:,} "
        f"total={share['total']:,} ratio={100 * share['ratio']:.3f}%"
    )


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "params":
        params_main(sys.argv[2:])
    elif command == "report":
        from gem_bench import report

        try:
            report.main(sys.argv[2:])
        except GemBenchError as exc:
            _fail(exc)
    else:
        _run()
        from gem_bench.train import end_processes

        end_processes()


if __name__ == "__main__":
    main()
