"""Tables and figures of the paper's artefacts, built from run records.

    python -m gem_bench.report [--experiment table3_cpu ...] [--paper] [--results results]

Each artefact is one experiment YAML (``configs/experiment/<name>.yaml``); its sweep grid
(``hydra.sweeper.params``) says which runs the artefact expects, so a run that is absent is
known to be missing. A record counts for a grid point when its model, task, method and seed
are on the grid, its profile is the experiment's, and every other setting the experiment fixes
(a swept ``method.ratio``, a ``task.epochs`` in the YAML body) equals the record's config. By
default the record's own ``run.experiment`` is not checked, so a run shared by two
experiments (figure3's GEM at 0.1% is table3's GEM) is reused; ``--same-experiment`` checks it.

Conventions (also written under each table):
- scores are percentages: ``metrics.test[metrics.main_metric] * 100``;
- ``mean±std`` over the finished seeds, std the sample std (ddof=1, as over the paper's three
  seeds); one finished seed shows no std;
- a cell with fewer finished seeds than the grid expects shows its mean with ``(n/N)`` and
  the failed count; a cell with none shows ``missing k/N`` / ``failed k/N``. Nothing is averaged
  silently over fewer seeds, and ``Avg`` (mean over a row's tasks) is shown only when every cell
  of the row is complete;
- bold marks the best method of each (model, task) among complete cells;
- ``--paper`` adds the paper's number and our difference to it: ``[paper 65.10, -3.90]``.

Outputs, under ``<results>``: ``tables/<name>.md`` and ``.tex`` (the laid-out table),
``tables/<name>.csv`` (one row per cell with every count, machine-readable), and for figures
``figures/<name>.png`` with its data in ``tables/<name>.csv``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gem_bench.errors import ConfigError, GemBenchError
from gem_bench.records import RECORD_NAME, read_record

MODEL_NAMES = {
    "opt-125m": "OPT-125M",
    "opt-1.3b": "OPT-1.3B",
    "phi-2": "Phi-2",
    "smollm2-135m": "SmolLM2-135M",
}
TASK_NAMES = {
    "rte": "RTE",
    "sst2": "SST-2",
    "wic": "WiC",
    "boolq": "BoolQ",
    "multirc": "MultiRC",
    "copa": "COPA",
    "squad": "SQuAD",
    "squad_v2": "SQuAD v2",
    "gsm8k": "GSM8k",
    "mbpp": "MBPP",
}
METHOD_NAMES = {
    "full": "FFT",
    "lora": "LoRA",
    "bitfit": "BitFit",
    "adapter": "Adapter",
    "adalora": "AdaLoRA",
    "random_mask": "Random Mask",
    "topgrad_mask": "Top Gradient Mask",
    "gem": "GEM",
    "gem_uniform": "Uniform",
    "gem_norm": "Norm only",
    "gem_entropy": "Entropy only",
}
QUANTITY_NAMES = {"score": "Score", "captured_rho": "Captured GWR (% of total)"}
DISPLAY = {"model": MODEL_NAMES, "task": TASK_NAMES, "method": METHOD_NAMES, "quantity": QUANTITY_NAMES}

# Grid axes read from the record's ``run`` block; any other axis is a dotted path into its config.
RUN_AXES = ("model", "task", "method", "seed")
# Keys of an experiment YAML that are not run settings.
NOT_SETTINGS = {"defaults", "hydra", "experiment_name"}


# The paper's published numbers (percent), typed from its Tables 2-5: package data.
PAPER_DIR = Path(__file__).resolve().parent / "data_files"


class ReportError(GemBenchError):
    pass


@dataclass(frozen=True)
class Layout:
    """How an artefact's cells are laid out: ``rows`` x ``column`` (tables) or a figure kind."""

    kind: str  # table | figure2 | figure3
    rows: tuple[str, ...] = ()
    column: str = "task"
    quantities: tuple[str, ...] = ("score",)
    avg: bool = False  # an Avg column over the tasks of a row
    params: bool = False  # a Params column (share of all parameters trained)


LAYOUTS = {
    "table2": Layout(
        "table", rows=("quantity", "model", "task"), column="method", quantities=("captured_rho", "score")
    ),
    "table3": Layout("table", rows=("model", "method"), column="task", avg=True, params=True),
    "table4": Layout("table", rows=("model", "task"), column="method"),
    "table5": Layout("table", rows=("model", "task"), column="method"),
    "figure2": Layout("figure2"),
    "figure3": Layout("figure3"),
}


def artefact_of(name: str) -> str:
    """``table3_cpu`` -> ``table3``: the CPU variants share their paper artefact's layout."""
    base = name.split("_")[0]
    if base not in LAYOUTS:
        raise ConfigError(f"experiment {name!r} is no paper artefact; valid: {', '.join(sorted(LAYOUTS))} (+ _cpu)")
    return base


# ---------------------------------------------------------------------------------------
# The grid an experiment expects


@dataclass
class Grid:
    name: str
    profile: str
    axes: dict[str, list[Any]]  # sweep key -> values, in the YAML's order
    fixed: dict[str, Any] = field(default_factory=dict)  # dotted setting -> value, from the YAML body

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.axes.get("seed", [])]

    @property
    def cell_axes(self) -> list[str]:
        return [k for k in self.axes if k != "seed"]

    def cells(self) -> list[tuple]:
        return list(itertools.product(*(self.axes[k] for k in self.cell_axes)))


def default_config_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "configs"
    return here if here.is_dir() else Path.cwd() / "configs"


def load_grid(name: str, config_dir: Path) -> Grid:
    path = Path(config_dir) / "experiment" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(config_dir) / "experiment").glob("*.yaml"))
        raise ConfigError(f"no experiment {name!r} ({path}); valid: {', '.join(known) or 'none'}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    params = (cfg.get("hydra") or {}).get("sweeper", {}).get("params") or {}
    if "seed" not in params:
        raise ConfigError(f"experiment {path} sweeps no seed: hydra.sweeper.params needs seed: 28,210,10283")
    parser = OverridesParser.create()
    axes = {}
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        axes[key] = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    profile = "paper"
    for entry in cfg.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.split()[-1].lstrip("/") == "profile":
                    profile = value
    body = {k: v for k, v in cfg.items() if k not in NOT_SETTINGS}
    return Grid(name=name, profile=profile, axes=axes, fixed=_flatten(body))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif not (isinstance(value, str) and "${" in value):  # interpolations are not comparable here
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------------------------------
# Records -> grid points


def load_records(results_dir: Path) -> list[dict[str, Any]]:
    """Every record under ``<results>/runs``; one that does not parse raises RecordError naming it."""
    records = []
    for path in sorted((Path(results_dir) / "runs").rglob(RECORD_NAME)):
        record = read_record(path)
        record["_path"] = str(path)
        records.append(record)
    return records


_ABSENT = object()  # a setting the record does not have (never equal to a grid value)


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _coordinate(record: dict[str, Any], axis: str) -> Any:
    return record["run"].get(axis, _ABSENT) if axis in RUN_AXES else _dotted(record.get("config") or {}, axis)


def select_runs(
    grid: Grid, records: Iterable[dict[str, Any]], pick: str = "error", same_experiment: bool = False
) -> dict[tuple, dict[int, dict[str, Any]]]:
    """grid cell -> {seed: record}, one variant per cell (see ``pick``)."""
    by_cell: dict[tuple, dict[str, dict[int, dict[str, Any]]]] = {}
    for record in records:
        run = record.get("run") or {}
        if run.get("profile", "paper") != grid.profile:
            continue
        if same_experiment and run.get("experiment") != grid.name:
            continue
        coords = {axis: _coordinate(record, axis) for axis in grid.axes}
        if not all(any(_same(coords[a], v) for v in values) for a, values in grid.axes.items()):
            continue
        if not all(_same(_dotted(record.get("config") or {}, k), v) for k, v in grid.fixed.items()):
            continue
        cell = tuple(next(v for v in grid.axes[a] if _same(coords[a], v)) for a in grid.cell_axes)
        variants = by_cell.setdefault(cell, {})
        variants.setdefault(run.get("variant", "?"), {})[int(coords["seed"])] = record
    return {cell: _one_variant(grid, cell, variants, pick) for cell, variants in by_cell.items()}


def _one_variant(grid: Grid, cell: tuple, variants: dict[str, dict[int, dict]], pick: str) -> dict[int, dict]:
    if len(variants) == 1:
        return next(iter(variants.values()))
    where = ", ".join(f"{a}={v}" for a, v in zip(grid.cell_axes, cell))
    if pick == "error":
        raise ReportError(
            f"{grid.name} [{where}]: records of {len(variants)} variants match ({', '.join(sorted(variants))}); "
            "remove the unwanted ones, or pass --pick best-dev to keep the one with the best mean dev score"
        )
    if pick != "best-dev":
        raise ConfigError(f"pick {pick!r} is not one of: error, best-dev")

    def dev_mean(runs: dict[int, dict]) -> float:
        scores = [_metric(r, "dev") for r in runs.values() if r["status"] == "finished"]
        return sum(scores) / len(scores) if scores else -math.inf

    return max(variants.values(), key=dev_mean)


def _metric(record: dict[str, Any], split: str) -> float:
    metrics = record.get("metrics") or {}
    name = metrics.get("main_metric")
    values = metrics.get(split) or {}
    if values.get(name) is None:
        raise ReportError(
            f"record {record['_path']} is finished but has no metrics.{split}[{name!r}] "
            f"(it has: {', '.join(values) or 'nothing'})"
        )
    value = float(values[name])
    if not 0.0 <= value <= 1.0:  # a percentage here would be shown as thousands of percent
        raise ReportError(f"record {record['_path']}: metrics.{split}[{name!r}] = {value} is not a fraction in [0, 1]")
    return value


def quantity_of(record: dict[str, Any], quantity: str) -> float:
    """A finished record's number for a table, in percent."""
    if quantity == "score":
        return 100.0 * _metric(record, "test")
    if quantity == "captured_rho":
        summary = record.get("method_summary") or {}
        # masking.Selection.summary() names it captured_rho_share; the record spec says captured_rho
        value = summary.get("captured_rho_share", summary.get("captured_rho"))
        if value is None:
            raise ReportError(f"record {record['_path']} has no method_summary.captured_rho_share (Table 2 needs it)")
        return 100.0 * float(value)
    raise ConfigError(f"quantity {quantity!r} is not one of: score, captured_rho")


# ---------------------------------------------------------------------------------------
# Cells: one tidy row per (grid cell, quantity)


def cell_frame(grid: Grid, runs: dict[tuple, dict[int, dict]], quantities: Iterable[str]) -> pd.DataFrame:
    rows = []
    expected = len(grid.seeds)
    for cell in grid.cells():
        seeds = runs.get(cell, {})
        done = [seeds[s] for s in grid.seeds if s in seeds and seeds[s]["status"] == "finished"]
        failed = sum(1 for s in grid.seeds if s in seeds and seeds[s]["status"] != "finished")
        ratios = [ratio for ratio in map(trained_share, done) if ratio is not None]
        variants = sorted({r["run"].get("variant", "?") for r in seeds.values()})
        for quantity in quantities:
            values = pd.Series([quantity_of(r, quantity) for r in done], dtype=float)
            rows.append(
                {
                    **dict(zip(grid.cell_axes, cell)),
                    "quantity": quantity,
                    "mean": values.mean() if len(values) else math.nan,
                    "std": values.std(ddof=1) if len(values) > 1 else math.nan,
                    "finished": len(values),
                    "failed": failed,
                    "expected": expected,
                    "params_pct": 100.0 * sum(ratios) / len(ratios) if ratios else math.nan,
                    "variant": ";".join(variants),
                }
            )
    frame = pd.DataFrame(rows)
    frame["complete"] = frame["finished"] == frame["expected"]
    return frame


def trained_share(record: dict[str, Any]) -> float | None:
    """Share of all parameters trained: params.trainable / params.total, else params.ratio."""
    params = record.get("params") or {}
    if params.get("trainable") is not None and params.get("total"):
        return float(params["trainable"]) / float(params["total"])
    return None if params.get("ratio") is None else float(params["ratio"])


def paper_numbers(artefact: str) -> pd.DataFrame:
    """The paper's published numbers for an artefact (percent), or an empty frame."""
    source = PAPER_DIR / f"paper_{artefact}.csv"
    if not source.is_file():
        return pd.DataFrame(columns=["model", "task", "method", "quantity", "value", "std", "params"])
    return pd.read_csv(source)


def add_paper(frame: pd.DataFrame, artefact: str) -> pd.DataFrame:
    paper = paper_numbers(artefact).rename(columns={"value": "paper", "std": "paper_std", "params": "paper_params"})
    keys = ["model", "task", "method", "quantity"]
    merged = frame.merge(paper[keys + ["paper", "paper_std", "paper_params"]], on=keys, how="left")
    merged["diff"] = merged["mean"] - merged["paper"]
    return merged


def mark_best(frame: pd.DataFrame) -> pd.DataFrame:
    """``best``: the highest complete mean among the methods of each (model, task, quantity, other axes)."""
    frame = frame.copy()
    group = [c for c in frame.columns if c in ("model", "task", "quantity")] + _extra_axes(frame)
    complete = frame["mean"].where(frame["complete"])
    top = complete.groupby([frame[c] for c in group]).transform("max")
    frame["best"] = complete.notna() & (complete == top)
    return frame


def _extra_axes(frame: pd.DataFrame) -> list[str]:
    """Swept settings other than model/task/method (e.g. method.ratio)."""
    return [c for c in frame.columns if "." in c]


# ---------------------------------------------------------------------------------------
# Rendering


def cell_text(row: pd.Series, paper: bool) -> tuple[str, str]:
    """(number, note): the number is what bold wraps; the note says what is incomplete."""
    n, expected, failed = int(row["finished"]), int(row["expected"]), int(row["failed"])
    if n == 0:
        missing = expected - failed
        parts = [f"failed {failed}/{expected}"] if failed else []
        parts += [f"missing {missing}/{expected}"] if missing else []
        return "", ", ".join(parts)
    number = f"{row['mean']:.2f}" + (f"±{row['std']:.2f}" if n > 1 else "")
    notes = []
    if n < expected:
        notes.append(f"({n}/{expected}" + (f", {failed} failed" if failed else "") + ")")
    if paper and "paper" in row and pd.notna(row["paper"]):
        notes.append(f"[paper {row['paper']:.2f}, {row['diff']:+.2f}]")
    return number, " ".join(notes)


def _styled(number: str, note: str, bold: bool, style: str) -> str:
    if style == "tex":
        number = number.replace("±", r"$\pm$")
        note = note.replace("%", r"\%").replace("_", r"\_")
        number = rf"\textbf{{{number}}}" if bold and number else number
    elif bold and number:
        number = f"**{number}**"
    return " ".join(p for p in (number, note) if p)


def _label(axis: str, value: Any) -> str:
    return DISPLAY.get(axis, {}).get(value, str(value))


def _tex_escape(text: str) -> str:
    return text.replace("%", r"\%").replace("_", r"\_").replace("&", r"\&")


def layout_table(frame: pd.DataFrame, grid: Grid, layout: Layout, paper: bool, style: str) -> pd.DataFrame:
    """The laid-out table of display strings (rows x columns in the grid's order)."""
    row_axes = list(layout.rows) + [a for a in _extra_axes(frame) if a not in layout.rows]
    order = {a: list(grid.axes.get(a, [])) for a in grid.axes}
    order["quantity"] = list(layout.quantities)
    columns = order[layout.column]
    row_keys = list(itertools.product(*(order[a] for a in row_axes)))
    lookup = {tuple(r[a] for a in row_axes + [layout.column]): r for _, r in frame.iterrows()}
    esc = _tex_escape if style == "tex" else (lambda s: s)

    table_rows = []
    for key in row_keys:
        cells = [lookup[key + (c,)] for c in columns]
        out = {esc(a.capitalize()): esc(_label(a, v)) for a, v in zip(row_axes, key)}
        if layout.params:
            out["Params"] = esc(_params_text(cells, paper))
        for column, cell in zip(columns, cells):
            out[esc(_label(layout.column, column))] = _styled(*cell_text(cell, paper), bool(cell["best"]), style)
        if layout.avg:
            out["Avg."] = _avg_text(cells, paper, style, best=_avg_is_best(frame, grid, layout, key, row_axes, columns))
        table_rows.append(out)
    return pd.DataFrame(table_rows)


def _params_text(cells: list[pd.Series], paper: bool) -> str:
    ours = [c["params_pct"] for c in cells if pd.notna(c["params_pct"])]
    text = f"{sum(ours) / len(ours):.3f}%" if ours else "–"
    theirs = [c.get("paper_params") for c in cells if pd.notna(c.get("paper_params", math.nan))]
    if paper and theirs:
        text += f" [paper {theirs[0]:g}%]"
    return text


def row_average(cells: list[pd.Series], column: str = "mean") -> float:
    """Mean over a row's cells, only when every cell is complete (NaN otherwise)."""
    if not all(bool(c["complete"]) for c in cells) or any(pd.isna(c.get(column, math.nan)) for c in cells):
        return math.nan
    return sum(float(c[column]) for c in cells) / len(cells)


def _avg_text(cells: list[pd.Series], paper: bool, style: str, best: bool) -> str:
    ours = row_average(cells)
    if math.isnan(ours):
        return "incomplete"
    note = ""
    if paper and all(pd.notna(c.get("paper", math.nan)) for c in cells):
        theirs = sum(float(c["paper"]) for c in cells) / len(cells)
        note = f"[paper {theirs:.2f}, {ours - theirs:+.2f}]"
    return _styled(f"{ours:.2f}", note, best, style)


def _avg_is_best(
    frame: pd.DataFrame, grid: Grid, layout: Layout, key: tuple, row_axes: list[str], columns: list
) -> bool:
    """Is this row's Avg the highest among the rows that share its model (and other non-method axes)?"""
    peers_axes = [a for a in row_axes if a != "method"]
    mine = dict(zip(row_axes, key))
    averages = {}
    for method in grid.axes.get("method", []):
        selector = (frame["method"] == method) & frame[layout.column].isin(columns)
        for axis in peers_axes:
            selector &= frame[axis] == mine[axis]
        averages[method] = row_average([r for _, r in frame[selector].iterrows()])
    valid = {m: v for m, v in averages.items() if not math.isnan(v)}
    return bool(valid) and mine.get("method") in valid and valid[mine["method"]] == max(valid.values())


def table_legend(grid: Grid, paper: bool) -> list[str]:
    lines = [
        f"Experiment `{grid.name}` (profile `{grid.profile}`), seeds {', '.join(map(str, grid.seeds))}.",
        "Cells: mean±std over finished seeds in percent (sample std, ddof=1); (n/N): only n of the N seeds "
        "finished; `missing`/`failed`: no finished seed. Bold: best complete cell of its model and task. "
        "Avg. only where every cell of the row is complete.",
    ]
    if paper:
        lines.append("[paper x, ±d]: the paper's number and our mean minus it.")
    return lines


def write_table(frame: pd.DataFrame, grid: Grid, layout: Layout, paper: bool, out_dir: Path) -> list[Path]:
    tables = out_dir / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    md = layout_table(frame, grid, layout, paper, "md")
    tex = layout_table(frame, grid, layout, paper, "tex")
    paths = [tables / f"{grid.name}.md", tables / f"{grid.name}.tex", tables / f"{grid.name}.csv"]
    legend = table_legend(grid, paper)
    paths[0].write_text(f"# {grid.name}\n\n" + md.to_markdown(index=False) + "\n\n" + "\n".join(legend) + "\n")
    tex_body = tex.to_latex(index=False, escape=False, column_format="l" * len(tex.columns))
    paths[1].write_text("% " + "\n% ".join(legend) + "\n" + tex_body)
    frame.to_csv(paths[2], index=False)
    return paths


# ---------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def figure2_frame(grid: Grid, runs: dict[tuple, dict[int, dict]]) -> pd.DataFrame:
    """Per method and epoch: relative weight change and loss reduction averaged over finished seeds,
    each divided by its largest value over all methods (the paper's "normalized")."""
    rows = []
    method_at = grid.cell_axes.index("method")
    for cell in grid.cells():
        done = [r for r in runs.get(cell, {}).values() if r["status"] == "finished" and r.get("figure2")]
        if not done:
            continue
        curves = {}
        for key in ("relative_weight_change", "loss_reduction"):
            series = [r["figure2"].get(key) or [] for r in done]
            if len({len(s) for s in series}) != 1:
                lengths = ", ".join(f"{r['_path']}: {len(s)}" for r, s in zip(done, series))
                raise ReportError(f"figure2.{key} has different numbers of epochs across seeds ({lengths})")
            curves[key] = pd.DataFrame(series, dtype=float).mean(axis=0)
        for epoch, (change, drop) in enumerate(zip(curves["relative_weight_change"], curves["loss_reduction"]), 1):
            rows.append({"method": cell[method_at], "epoch": epoch, "relative_weight_change": change,
                         "loss_reduction": drop, "finished": len(done), "expected": len(grid.seeds)})
    columns = ["method", "epoch", "relative_weight_change", "loss_reduction", "finished", "expected"]
    frame = pd.DataFrame(rows, columns=columns)
    for key in ("relative_weight_change", "loss_reduction"):
        scale = frame[key].abs().max() if len(frame) else 0.0
        frame[f"{key}_normalised"] = frame[key] / scale if scale else frame[key]
    return frame


def plot_figure2(frame: pd.DataFrame, grid: Grid, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panels = (("relative_weight_change", "(a) Relative weight change"), ("loss_reduction", "(b) Loss reduction"))
    for ax, (key, title) in zip(axes, panels):
        for method in grid.axes["method"]:
            curve = frame[frame["method"] == method]
            if curve.empty:
                continue
            label = _label("method", method)
            n, expected = int(curve["finished"].iloc[0]), int(curve["expected"].iloc[0])
            label += f" ({n}/{expected} seeds)" if n < expected else ""
            ax.plot(curve["epoch"], curve[f"{key}_normalised"], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("Epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("Normalized value")
    axes[0].legend(fontsize=8)
    models = ", ".join(_label("model", m) for m in grid.axes["model"])
    tasks = ", ".join(_label("task", t) for t in grid.axes["task"])
    fig.suptitle(f"Masking strategies: {models} on {tasks} ({grid.name})")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def figure3_frame(grid: Grid, runs: dict, baselines: Grid | None, baseline_runs: dict) -> pd.DataFrame:
    """One point per GEM ratio and per baseline method: the average over the grid's tasks of the
    per-task mean score, only when every task is complete (else NaN, with the counts)."""
    ratio_axis = "method.ratio"
    frame = cell_frame(grid, runs, ["score"])
    points = []
    for (method, ratio), group in frame.groupby(["method", ratio_axis], sort=False):
        cells = [r for _, r in group.iterrows()]
        points.append(_point(method, 100.0 * float(ratio), cells, grid.name))
    if baselines is not None:
        base = cell_frame(baselines, baseline_runs, ["score"])
        base = base[base["model"].isin(grid.axes["model"]) & base["task"].isin(grid.axes["task"])]
        for method, group in base.groupby("method", sort=False):
            cells = [r for _, r in group.iterrows()]
            ratios = group["params_pct"].dropna()
            points.append(_point(method, float(ratios.mean()) if len(ratios) else math.nan, cells, baselines.name))
    return pd.DataFrame(points)


def _point(method: str, ratio_pct: float, cells: list[pd.Series], source: str) -> dict[str, Any]:
    return {
        "method": method,
        "ratio_pct": ratio_pct,
        "average": row_average(cells),
        "complete_tasks": sum(bool(c["complete"]) for c in cells),
        "tasks": len(cells),
        "source": source,
    }


def plot_figure3(points: pd.DataFrame, grid: Grid, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter
    fig, ax = plt.subplots(figsize=(6, 4))
    shown = points.dropna(subset=["average", "ratio_pct"])
    gem = shown[shown["source"] == grid.name].sort_values("ratio_pct")
    if len(gem):
        ax.plot(gem["ratio_pct"], gem["average"], marker="o", color="tab:red", label="GEM")
    for _, p in shown[shown["source"] != grid.name].iterrows():
        ax.scatter(p["ratio_pct"], p["average"], marker="s", label=_label("method", p["method"]))
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(shown["ratio_pct"].round(4))))  # label the ratios that are drawn
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("Tunable parameters (share of all, log scale)")
    ax.set_ylabel(f"Average score over {len(grid.axes['task'])} tasks (%)")
    models = ", ".join(_label("model", m) for m in grid.axes["model"])
    ax.set_title(f"{models}: score vs tunable ratio ({grid.name})")
    ax.legend(fontsize=8)
    left_out = points[points["average"].isna()]
    if len(left_out):  # say so on the figure, not only in the log
        names = "; ".join(
            f"{_label('method', p['method'])} {p['ratio_pct']:g}% ({p['complete_tasks']}/{p['tasks']} tasks)"
            for _, p in left_out.iterrows()
        )
        fig.text(0.01, 0.01, f"Incomplete, not drawn: {names}", fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if len(left_out) else 0, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Driver


def build(
    name: str,
    records: list[dict[str, Any]],
    config_dir: Path,
    out_dir: Path,
    paper: bool = False,
    pick: str = "error",
    same_experiment: bool = False,
) -> list[Path]:
    """Write one artefact's outputs; return their paths."""
    artefact = artefact_of(name)
    layout = LAYOUTS[artefact]
    grid = load_grid(name, config_dir)
    runs = select_runs(grid, records, pick, same_experiment)
    if layout.kind == "table":
        frame = mark_best(cell_frame(grid, runs, layout.quantities))
        if paper:
            frame = add_paper(frame, artefact)
        return write_table(frame, grid, layout, paper, out_dir)

    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    data, png = out_dir / "tables" / f"{name}.csv", out_dir / "figures" / f"{name}.png"
    if layout.kind == "figure2":
        frame = figure2_frame(grid, runs)
        frame.to_csv(data, index=False)
        plot_figure2(frame, grid, png)
    else:
        base_name = name.replace("figure3", "table3", 1)
        base = load_grid(base_name, config_dir)
        points = figure3_frame(grid, runs, base, select_runs(base, records, pick, same_experiment))
        points.to_csv(data, index=False)
        for _, p in points[points["average"].isna()].iterrows():
            print(
                f"{name}: {p['method']} at {p['ratio_pct']:g}% left out: "
                f"{p['complete_tasks']}/{p['tasks']} tasks complete",
                file=sys.stderr,
            )
        plot_figure3(points, grid, png)
    return [png, data]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gem-bench report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", type=Path, default=Path("results"), help="results folder holding runs/ (default: results)"
    )
    parser.add_argument("--out", type=Path, default=None, help="where tables/ and figures/ go (default: --results)")
    parser.add_argument("--configs", type=Path, default=None, help="the configs folder (default: the repository's)")
    parser.add_argument("--experiment", action="append", default=None,
                        help="artefact to build, e.g. table3_cpu (repeatable; default: every one with records)")
    parser.add_argument("--paper", action="store_true", help="show the paper's numbers and our difference")
    parser.add_argument("--pick", choices=["error", "best-dev"], default="error",
                        help="when several variants (e.g. learning rates) fill one cell: fail, "
                        "or keep the one with the best mean dev score")
    parser.add_argument("--same-experiment", action="store_true",
                        help="count only records whose run.experiment is the experiment's name")
    args = parser.parse_args(argv)

    config_dir = args.configs or default_config_dir()
    out_dir = args.out or args.results
    records = load_records(args.results)
    names = args.experiment or sorted(p.stem for p in (config_dir / "experiment").glob("*.yaml"))
    if not names:
        raise ConfigError(f"no experiment YAMLs in {config_dir / 'experiment'}; pass --configs <the configs folder>")
    for name in names:
        if not args.experiment:
            if name.split("_")[0] not in LAYOUTS:
                print(f"{name}: not a paper artefact ({', '.join(LAYOUTS)}), skipped")
                continue
            grid = load_grid(name, config_dir)
            if not select_runs(grid, records, args.pick, args.same_experiment):
                print(f"{name}: no records, skipped")
                continue
        for path in build(name, records, config_dir, out_dir, args.paper, args.pick, args.same_experiment):
            print(path)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GemBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
