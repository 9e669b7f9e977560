"""The report on synthetic records, the experiment grids, and the Slurm launcher config."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from gem_bench import report
from gem_bench.records import RecordError, run_dir, write_json_atomic

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SEEDS = (28, 210, 10283)

MINI_TABLE3 = """\
# @package _global_
experiment_name: table3_mini
hydra:
  sweeper:
    params:
      model: opt-125m
      task: rte,sst2
      method: lora,gem
      seed: 28,210,10283
"""


def write_run(results: Path, model: str, task: str, method: str, seed: int, score: float | None = 0.5, *,
              status: str = "finished", profile: str = "paper", variant: str | None = None, dev: float = 0.5,
              ratio: float = 0.001, captured_rho: float | None = None, method_cfg: dict | None = None,
              figure2: dict | None = None, experiment: str | None = None) -> Path:
    variant = variant or f"{profile}-0000abcd"
    path = run_dir(results, model, task, method, variant, seed) / "record.json"
    record = {
        "schema": 1,
        "status": status,
        "run": {"model": model, "task": task, "method": method, "variant": variant, "seed": seed,
                "profile": profile, "experiment": experiment},
        "config": {"model": {"name": model}, "task": {"name": task, "epochs": 10},
                   "method": {"name": method, "ratio": ratio, **(method_cfg or {})}, "seed": seed, "profile": profile},
        "metrics": {"main_metric": "accuracy", "test": {"accuracy": score}, "dev": {"accuracy": dev}}
        if status == "finished" else {},
        "params": {"trainable": round(ratio * 100000), "total": 100000, "ratio": ratio},
        "failure": None if status == "finished" else {"type": "FloatingPointError", "message": "nan", "step": 3},
    }
    if captured_rho is not None:
        record["method_summary"] = {"captured_rho_share": captured_rho}
    if figure2 is not None:
        record["figure2"] = figure2
    write_json_atomic(path, record)
    return path


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "table3_mini.yaml").write_text(MINI_TABLE3)
    return tmp_path / "configs"


def run_report(tmp_path: Path, configs: Path, *extra: str) -> None:
    assert report.main(["--results", str(tmp_path / "results"), "--configs", str(configs), *extra]) == 0


def cells(tmp_path: Path, name: str = "table3_mini") -> pd.DataFrame:
    return pd.read_csv(tmp_path / "results" / "tables" / f"{name}.csv").set_index(["task", "method"])


def full_grid(results: Path) -> None:
    scores = {("rte", "lora"): (0.60, 0.62, 0.64), ("rte", "gem"): (0.65, 0.66, 0.67),
              ("sst2", "lora"): (0.90, 0.91, 0.92), ("sst2", "gem"): (0.88, 0.89, 0.90)}
    for (task, method), values in scores.items():
        for seed, value in zip(SEEDS, values):
            write_run(results, "opt-125m", task, method, seed, value)


def test_means_stds_avg_and_bold(tmp_path: Path, configs: Path) -> None:
    full_grid(tmp_path / "results")
    run_report(tmp_path, configs)
    frame = cells(tmp_path)
    assert frame.loc[("rte", "lora"), "mean"] == pytest.approx(62.0)
    assert frame.loc[("rte", "lora"), "std"] == pytest.approx(2.0)  # sample std of 60, 62, 64
    assert frame.loc[("rte", "gem"), "best"] and not frame.loc[("rte", "lora"), "best"]
    assert frame.loc[("sst2", "lora"), "best"] and not frame.loc[("sst2", "gem"), "best"]
    assert frame.loc[("rte", "gem"), "params_pct"] == pytest.approx(0.1)

    md = (tmp_path / "results" / "tables" / "table3_mini.md").read_text()
    gem_row = next(line for line in md.splitlines() if "| GEM" in line)
    assert "**66.00±1.00**" in gem_row and "89.00±1.00" in gem_row and "**89.00" not in gem_row
    assert "0.100%" in gem_row
    assert "**77.50**" in gem_row  # Avg of 66 and 89, the best of OPT-125M's rows
    lora_row = next(line for line in md.splitlines() if "| LoRA" in line)
    assert "| 76.50" in lora_row and "**76.50" not in lora_row
    tex = (tmp_path / "results" / "tables" / "table3_mini.tex").read_text()
    assert r"\textbf{66.00$\pm$1.00}" in tex and r"0.100\%" in tex


def test_trained_share_prefers_the_counts() -> None:
    share = report.trained_share({"params": {"trainable": 27, "total": 28832, "ratio": 0.001}})
    assert share == pytest.approx(27 / 28832)
    assert report.trained_share({"params": {"ratio": 0.001}}) == 0.001
    assert report.trained_share({"params": {"trainable": 1792}}) is None


def test_missing_and_failed_cells_are_marked_never_averaged(tmp_path: Path, configs: Path) -> None:
    results = tmp_path / "results"
    full_grid(results)
    # rte/gem: two finished, one failed; sst2/gem: nothing but one failure
    write_run(results, "opt-125m", "rte", "gem", 10283, status="failed")
    for seed in SEEDS:
        (run_dir(results, "opt-125m", "sst2", "gem", "paper-0000abcd", seed) / "record.json").unlink()
    write_run(results, "opt-125m", "sst2", "gem", 28, status="failed")
    run_report(tmp_path, configs)

    frame = cells(tmp_path)
    assert frame.loc[("rte", "gem"), "mean"] == pytest.approx(65.5)  # the two finished seeds, flagged below
    assert (frame.loc[("rte", "gem"), "finished"], frame.loc[("rte", "gem"), "failed"]) == (2, 1)
    assert not frame.loc[("rte", "gem"), "complete"] and not frame.loc[("rte", "gem"), "best"]
    assert frame.loc[("rte", "lora"), "best"]  # the best among complete cells
    assert math.isnan(frame.loc[("sst2", "gem"), "mean"])

    md = (tmp_path / "results" / "tables" / "table3_mini.md").read_text()
    gem_row = next(line for line in md.splitlines() if "| GEM" in line)
    assert "65.50±0.71 (2/3, 1 failed)" in gem_row
    assert "failed 1/3, missing 2/3" in gem_row
    assert gem_row.rstrip(" |").endswith("incomplete")


def test_paper_numbers_and_difference(tmp_path: Path, configs: Path) -> None:
    full_grid(tmp_path / "results")
    run_report(tmp_path, configs, "--paper")
    frame = cells(tmp_path)
    assert frame.loc[("rte", "gem"), "paper"] == pytest.approx(65.10)
    assert frame.loc[("rte", "gem"), "diff"] == pytest.approx(66.0 - 65.10)
    md = (tmp_path / "results" / "tables" / "table3_mini.md").read_text()
    assert "[paper 65.10, +0.90]" in md
    assert "[paper 0.1%]" in md and "[paper 0.235%]" in md  # the Params column
    assert "[paper 77.31, +0.19]" in md  # Avg over RTE and SST-2: (65.10 + 89.53) / 2


def test_record_that_does_not_parse_fails_naming_the_file(tmp_path: Path, configs: Path) -> None:
    full_grid(tmp_path / "results")
    bad = run_dir(tmp_path / "results", "opt-125m", "wic", "gem", "paper-deadbeef", 28) / "record.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema": 1, "status": "fin')
    with pytest.raises(RecordError, match=str(bad)):
        run_report(tmp_path, configs)


def test_records_off_the_grid_do_not_count(tmp_path: Path, configs: Path) -> None:
    results = tmp_path / "results"
    full_grid(results)
    write_run(results, "opt-125m", "rte", "bitfit", 28, 0.99)  # method not on the grid
    write_run(results, "opt-125m", "rte", "gem", 28, 0.99, profile="cpu")  # another profile
    write_run(results, "opt-1.3b", "rte", "gem", 28, 0.99)  # another model
    run_report(tmp_path, configs)
    assert cells(tmp_path).loc[("rte", "gem"), "mean"] == pytest.approx(66.0)


def test_experiment_fixed_settings_filter_records(tmp_path: Path) -> None:
    grid = report.Grid("figure3_x", "paper", {"model": ["phi-2"], "task": ["rte"], "method": ["gem"],
                                                "method.ratio": [0.005, 0.001], "seed": [28]}, {"task.epochs": 10})
    results = tmp_path / "results"
    write_run(results, "phi-2", "rte", "gem", 28, 0.7, ratio=0.005, variant="paper-a")
    write_run(results, "phi-2", "rte", "gem", 28, 0.6, ratio=0.001, variant="paper-b")
    write_run(results, "phi-2", "rte", "gem", 28, 0.5, ratio=0.002, variant="paper-c")  # ratio not swept
    runs = report.select_runs(grid, report.load_records(results))
    assert sorted(runs) == [("phi-2", "rte", "gem", 0.001), ("phi-2", "rte", "gem", 0.005)]
    grid.fixed["task.epochs"] = 3
    assert report.select_runs(grid, report.load_records(results)) == {}


def test_two_variants_in_one_cell(tmp_path: Path, configs: Path) -> None:
    results = tmp_path / "results"
    full_grid(results)
    for seed in SEEDS:  # the same cell at another learning rate, better on dev, worse on test
        write_run(results, "opt-125m", "rte", "gem", seed, 0.40, dev=0.9, variant="paper-11111111",
                  method_cfg={"lr": 1e-4})
    with pytest.raises(report.ReportError, match="paper-0000abcd, paper-11111111"):
        run_report(tmp_path, configs)
    run_report(tmp_path, configs, "--pick", "best-dev")
    assert cells(tmp_path).loc[("rte", "gem"), "mean"] == pytest.approx(40.0)


def test_same_experiment_only(tmp_path: Path, configs: Path) -> None:
    results = tmp_path / "results"
    full_grid(results)
    write_run(results, "opt-125m", "rte", "gem", 28, 0.66, experiment="table3_mini")
    run_report(tmp_path, configs, "--same-experiment")
    frame = cells(tmp_path)
    assert frame.loc[("rte", "gem"), "finished"] == 1 and frame.loc[("rte", "lora"), "finished"] == 0


def test_table2_captured_rho_block(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    (configs / "experiment").mkdir(parents=True)
    (configs / "experiment" / "table2_mini.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      model: opt-1.3b\n      task: sst2\n"
        "      method: gem_uniform,gem\n      seed: 28,210\n"
    )
    for method, rho, acc in (("gem_uniform", 0.50, 0.90), ("gem", 0.72, 0.94)):
        for seed in (28, 210):
            write_run(tmp_path / "results", "opt-1.3b", "sst2", method, seed, acc, captured_rho=rho)
    run_report(tmp_path, configs, "--paper")
    frame = pd.read_csv(tmp_path / "results" / "tables" / "table2_mini.csv").set_index(["quantity", "method"])
    assert frame.loc[("captured_rho", "gem"), "mean"] == pytest.approx(72.0)
    assert frame.loc[("captured_rho", "gem"), "paper"] == pytest.approx(71.70)
    assert frame.loc[("score", "gem_uniform"), "paper"] == pytest.approx(91.74)
    md = (tmp_path / "results" / "tables" / "table2_mini.md").read_text()
    assert "Captured GWR (% of total)" in md and "**72.00±0.00** [paper 71.70, +0.30]" in md


def test_figures_are_drawn(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    (configs / "experiment").mkdir(parents=True)
    head = "# @package _global_\ndefaults:\n  - override /profile: cpu\nhydra:\n  sweeper:\n    params:\n"
    (configs / "experiment" / "figure2_mini.yaml").write_text(
        head + "      model: opt-125m\n      task: wic\n      method: gem,random_mask\n      seed: 28,210\n")
    (configs / "experiment" / "figure3_mini.yaml").write_text(
        head + "      model: phi-2\n      task: rte,sst2\n      method: gem\n      method.ratio: 0.005,0.001\n"
        "      seed: 28,210\n")
    (configs / "experiment" / "table3_mini.yaml").write_text(
        head + "      model: phi-2\n      task: rte,sst2\n      method: lora\n      seed: 28,210\n")
    results = tmp_path / "results"
    for seed, scale in ((28, 1.0), (210, 3.0)):
        for method, factor in (("gem", 2.0), ("random_mask", 1.0)):
            curves = {"relative_weight_change": [factor * scale, 2 * factor * scale],
                      "loss_reduction": [0.1 * factor, 0.2 * factor]}
            write_run(results, "opt-125m", "wic", method, seed, profile="cpu", figure2=curves)
        for task in ("rte", "sst2"):
            write_run(results, "phi-2", task, "gem", seed, 0.8, profile="cpu", ratio=0.005, variant="cpu-a")
            write_run(results, "phi-2", task, "gem", seed, 0.7, profile="cpu", ratio=0.001, variant="cpu-b")
            write_run(results, "phi-2", task, "lora", seed, 0.6, profile="cpu", ratio=0.002)
    (run_dir(results, "phi-2", "sst2", "gem", "cpu-b", 210) / "record.json").unlink()  # 0.1% is incomplete
    run_report(tmp_path, configs, "--experiment", "figure2_mini", "--experiment", "figure3_mini")

    fig2 = pd.read_csv(results / "tables" / "figure2_mini.csv").set_index(["method", "epoch"])
    assert fig2.loc[("gem", 2), "relative_weight_change"] == pytest.approx(8.0)  # mean of 4 and 12
    assert fig2.loc[("gem", 2), "relative_weight_change_normalised"] == pytest.approx(1.0)
    assert fig2.loc[("random_mask", 1), "loss_reduction_normalised"] == pytest.approx(0.25)
    fig3 = pd.read_csv(results / "tables" / "figure3_mini.csv").set_index(["method", "ratio_pct"])
    assert fig3.loc[("gem", 0.5), "average"] == pytest.approx(80.0)
    assert math.isnan(fig3.loc[("gem", 0.1), "average"]) and fig3.loc[("gem", 0.1), "complete_tasks"] == 1
    assert fig3.loc[("lora", 0.2), "average"] == pytest.approx(60.0)
    for name in ("figure2_mini", "figure3_mini"):
        assert (results / "figures" / f"{name}.png").stat().st_size > 1000


def test_unknown_experiment_names_the_choices(tmp_path: Path, configs: Path) -> None:
    with pytest.raises(report.ConfigError, match="table3_mini"):
        report.load_grid("table9", configs)


EXPECTED_GRIDS = {
    "table3": (3 * 7 * 8, 3),
    "table3_cpu": (3 * 8, 3),
    "table2": (3 * 3, 3),
    "table2_cpu": (3 * 3, 3),
    "table4": (3 * 2 * 4, 3),
    "table4_cpu": (2 * 4, 3),
    "table5": (2 * 5, 3),
    "table5_cpu": (2 * 5, 3),
    "figure2": (4, 3),
    "figure2_cpu": (4, 3),
    "figure3": (7 * 4, 3),
    "figure3_cpu": (3 * 4, 3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_GRIDS))
def test_experiment_grid_sizes(name: str) -> None:
    grid = report.load_grid(name, CONFIGS)
    cells, seeds = EXPECTED_GRIDS[name]
    assert (len(grid.cells()), grid.seeds) == (cells, list(SEEDS))
    assert grid.profile == ("cpu" if name.endswith("_cpu") else "paper")
    assert OmegaConf.load(CONFIGS / "experiment" / f"{name}.yaml").experiment_name == name
    assert report.artefact_of(name) in report.LAYOUTS


def test_every_experiment_yaml_is_known() -> None:
    assert sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")) == sorted(EXPECTED_GRIDS)


def test_table3_grid_is_the_papers() -> None:
    grid = report.load_grid("table3", CONFIGS)
    paper = report.paper_numbers("table3")
    assert len(paper) == len(grid.cells()) == 168
    keys = set(zip(paper["model"], paper["task"], paper["method"]))
    assert keys == set(grid.cells())


@pytest.mark.parametrize("group", ["model", "task", "method"])
def test_experiment_choices_have_config_files(group: str) -> None:
    available = {p.stem for p in (CONFIGS / group).glob("*.yaml")}
    if not available:
        pytest.skip(f"configs/{group}/ not written yet")
    used = set(itertools.chain.from_iterable(
        report.load_grid(name, CONFIGS).axes[group] for name in EXPECTED_GRIDS))
    assert used <= available, f"configs/{group}/ lacks {sorted(used - available)}"


def test_slurm_launcher_reads_local_settings() -> None:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    launcher = OmegaConf.load(CONFIGS / "hydra" / "launcher" / "slurm.yaml")
    assert list(launcher.pop("defaults")) == ["submitit_slurm", "_self_"]
    merged = OmegaConf.merge(OmegaConf.structured(SlurmQueueConf), launcher)  # unknown fields fail here
    hydra = {"launcher": merged, "sweep": {"dir": "multirun/x"}, "job": {"name": "gem"}}

    with_local = OmegaConf.create({"hydra": hydra, "local": OmegaConf.load(CONFIGS / "local" / "example.yaml")})
    resolved = OmegaConf.to_container(with_local.hydra.launcher, resolve=True)
    assert (resolved["partition"], resolved["gpus_per_node"], resolved["tasks_per_node"]) == ("gpu", 1, 1)
    assert resolved["setup"] == ["source .venv/bin/activate"]

    bare = OmegaConf.to_container(OmegaConf.create({"hydra": hydra, "local": None}).hydra.launcher, resolve=True)
    assert bare["partition"] is None and bare["timeout_min"] == 240 and bare["array_parallelism"] == 32


@pytest.mark.parametrize("score, message", [(65.1, "is not a fraction"), (None, r"has no metrics.test\['accuracy'\]")])
def test_bad_metric_values_fail_naming_the_record(tmp_path: Path, configs: Path, score, message: str) -> None:
    full_grid(tmp_path / "results")
    path = write_run(tmp_path / "results", "opt-125m", "rte", "gem", 28, score)
    with pytest.raises(report.ReportError, match=message) as info:
        run_report(tmp_path, configs)
    assert str(path) in str(info.value)
