"""The speed benchmark: a worker process reports its numbers, the short bench writes its files,
the targets are judged right, and the sparse delta gradient's two strategies agree."""

import json

import pytest
import torch

from gem_bench import bench, sparse

# One thread: a tiny model's ops are too small to share, and spinning threads crawl on a busy machine.
TINY = ["--model", "tiny-llama", "--threads", "1", "--scoring-examples", "4", "--selection-reps", "1"]


@pytest.fixture
def mirror_env(mirror, monkeypatch):
    monkeypatch.setenv("GEM_BENCH_DATA", str(mirror))


def test_worker_process_reports_positive_rss(mirror_env):
    args = bench.parse_args(["--short", *TINY])
    result = bench.run_worker("gem", args)  # a real subprocess, as the bench runs it
    assert result["peak_rss_mib"] > 0
    assert len(result["step_s"]) == args.steps and all(t > 0 for t in result["step_s"])
    assert result["sequences"] == 2 * bench.NUM_EXAMPLES
    assert result["selection_s"] and result["delta"]["entries"] == result["trainable"] > 0


@pytest.fixture
def cached_splits(monkeypatch):
    """Each worker samples SST-2 again (once per process); in one process, once is enough."""
    from gem_bench import data

    cache, sample = {}, data.sample_splits

    def cached(task, cfg, root, seed):
        key = (cfg.name, cfg.num_train, cfg.num_test, seed)
        if key not in cache:
            cache[key] = sample(task, cfg, root, seed)
        return cache[key]

    monkeypatch.setattr(data, "sample_splits", cached)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _in_process(variant, args):
    """The worker's own code without a new process (one import of torch for the whole test)."""
    torch.set_num_threads(args.threads)
    if variant == bench.SCORING:
        return bench._scoring_worker(args)
    return bench._train_worker(variant, args)


def test_short_bench_writes_json_and_markdown(mirror_env, cached_splits, restore_threads, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_worker", _in_process)
    bench.main(["--name", "ci-test", "--short", *TINY, "--out", str(tmp_path)])

    report = json.loads((tmp_path / "ci-test.json").read_text())
    assert set(report["raw"]) == {*bench.TRAIN_VARIANTS, bench.SCORING}
    assert report["command"].startswith("python -m gem_bench.bench --name ci-test --short")
    assert {"cpu", "cores", "torch", "threads", "date"} <= set(report["machine"])
    ratios = report["summary"]["ratios"]
    assert set(ratios) == set(bench.TARGETS)
    for r in ratios.values():
        assert r["value"] is not None and r["value"] > 0 and isinstance(r["met"], bool)
    assert ratios["delta_bytes_per_entry"]["value"] == 8.0  # int32 index + fp32 value
    for v in report["summary"]["variants"].values():
        assert 0 < v["min_step_s"] <= v["step_s"] <= v["max_step_s"] and v["peak_rss_mib"] > 0

    md = (tmp_path / "ci-test.md").read_text()
    assert "| variant | trainable | s/step | min-max s/step | peak RSS (MiB) |" in md
    assert "| GEM / LoRA step time |" in md and "python -m gem_bench.bench --name ci-test" in md


def test_summary_judges_targets():
    def train(step, rss, **extra):
        return [{"step_s": [step], "peak_rss_mib": rss, "trainable": 1, **extra}]

    raw = {
        "full": train(2.0, 300.0),
        "lora": train(1.0, 200.0),
        "gem": train(
            1.2,
            190.0,
            selection_s=[0.5],
            delta={"file_bytes": 1100, "header_bytes": 100, "entries": 100},
        ),
        bench.SCORING: [{"one_pass_s": [1.0], "per_candidate_s": [3.0], "examples": 4}],
    }
    ratios = bench.summarise(raw, cuda=False)["ratios"]
    assert ratios["gem_over_lora_step"]["value"] == pytest.approx(1.2) and ratios["gem_over_lora_step"]["met"] is False
    assert ratios["gem_over_full_step"]["value"] == pytest.approx(0.6) and ratios["gem_over_full_step"]["met"] is True
    assert ratios["gem_over_lora_peak_memory"]["met"] is True
    assert ratios["selection_over_step"]["value"] == pytest.approx(0.5 / 1.2)
    assert ratios["one_pass_speedup"]["value"] == pytest.approx(3.0) and ratios["one_pass_speedup"]["met"] is True
    assert ratios["delta_bytes_per_entry"]["value"] == pytest.approx(10.0)


def test_missing_variant_leaves_its_ratio_open():
    raw = {"lora": [{"step_s": [1.0], "peak_rss_mib": 1.0, "trainable": 1}]}
    ratios = bench.summarise(raw, cuda=False)["ratios"]
    assert ratios["gem_over_lora_step"] == {**ratios["gem_over_lora_step"], "value": None, "met": None}


def test_worker_command_carries_the_gpu_flags():
    args = bench.parse_args(["--model", "opt-1.3b", "--random-weights", "--dtype", "bfloat16", "--steps", "3"])
    cmd = bench._worker_command("gem", args)
    assert cmd[cmd.index("--model") + 1] == "opt-1.3b" and "--random-weights" in cmd
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16" and cmd[cmd.index("--steps") + 1] == "3"


def test_random_weights_build_the_model_from_its_arch(mirror_env):
    args = bench.parse_args(["--model", "tiny-opt", "--random-weights", "--dtype", "bfloat16"])
    cfg = bench._compose(args, "gem", [])
    model, tokenizer = bench._load_model(cfg, args)
    assert model.config.model_type == "opt" and next(model.parameters()).dtype == torch.bfloat16
    assert max(tokenizer("It was great").input_ids) < model.config.vocab_size


@pytest.mark.parametrize("flags", [["--variants", "gem,qlora"], ["--steps", "0"]])
def test_bad_arguments_name_the_choices(flags, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(flags)
    assert "--" in capsys.readouterr().err


@pytest.mark.parametrize("k", [3, 40, 500])  # below and above the gather / product crossover
def test_delta_gradient_strategies_match_the_dense_product(k, monkeypatch):
    gen = torch.Generator().manual_seed(k)
    grad_out, x = torch.randn(2, 5, 24, generator=gen), torch.randn(2, 5, 32, generator=gen)
    indices = torch.sort(torch.randperm(24 * 32, generator=gen)[:k]).values
    dense = (grad_out.reshape(-1, 24).t() @ x.reshape(-1, 32)).reshape(-1)[indices]
    monkeypatch.setattr(sparse, "_CHUNK_ELEMENTS", 64)  # several chunks / row blocks
    for density in (0.0, 2.0):  # always the blocked product; always the gather
        monkeypatch.setattr(sparse, "_PRODUCT_DENSITY", density)
        torch.testing.assert_close(sparse._delta_grad(grad_out, x, indices, 32), dense, rtol=1e-5, atol=1e-5)
