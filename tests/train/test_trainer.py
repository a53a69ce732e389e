"""A short real training run (in this process, one rank): the loss falls, the run directory holds
what the documentation promises, and a diverging run stops with a clear error."""
import json
import sysconfig
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from train.config import load_config, register_schemas

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
register_schemas()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~0.5 MB of real text: a few standard-library packages."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("json", "email", "logging"):
        for src in sorted((stdlib / pkg).glob("*.py")):
            (root / f"{pkg}_{src.stem}.txt").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return root


def _config(corpus: Path, tmp: Path, *overrides: str):
    base = [f"data.source={corpus}", f"data.cache_dir={tmp / 'cache'}", f"run_dir={tmp / 'run'}",
            "model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
            "model.vocab_size=512", "model.multiple_of=16", "model.max_seq_len=64",
            "data.seq_len=32", "data.batch_size=8", "train.steps=40", "optim.warmup_steps=5",
            "logging.every=5", "eval.every=20", "eval.batches=2", "checkpoint.interval=0",
            "layerskip.exit.exits=1:", "layerskip.exit.period=2", "layerskip.dropout.p_max=0.2"]
    with initialize_config_dir(version_base="1.3", config_dir=str(RECIPES)):
        return load_config(compose("train", overrides=base + list(overrides)))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_learns_and_writes_its_run_directory(corpus, tmp_path):
    from train.trainer import run
    cfg = _config(corpus, tmp_path)
    run_dir = run(cfg)
    records = _records(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [0, 20, 40]
    # validation loss of the final layer and of an early exit both fall well below the start
    assert val[-1]["val/loss"] < val[0]["val/loss"] - 1.0
    assert val[-1]["val/loss/exit_02"] < val[0]["val/loss/exit_02"] - 1.0
    assert train[-1]["loss"] < train[0]["loss"]
    for key in ("step", "loss", "lr", "tokens_per_s", "grad_norm", "balance/slowest_step_s",
                "layerskip/saved_block_compute", "loss/exit_04"):
        assert key in train[-1], key
    # MFU: omitted rather than shown above 100 % (a CPU peak measured on a busy machine)
    assert all(0 < r["throughput/mfu_pct"] <= 100 for r in train if "throughput/mfu_pct" in r)
    assert any(k.startswith("layerskip/drop_fraction/block_") for k in train[-1])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer.model").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "step-0000040" / "COMPLETE").is_file()  # the final save


def test_continual_pretraining_starts_from_an_exported_run(corpus, tmp_path):
    """export -> model.init_from: the new run starts where the old one ended (same weights, same
    tokenizer, so the same validation loss at step 0)."""
    import torch

    from train.export import export_run
    from train.trainer import run
    first = run(_config(corpus, tmp_path / "a", "train.steps=10", "eval.every=0"))
    hf = export_run(first, tmp_path / "hf", dtype=torch.float32)
    second = run(_config(corpus, tmp_path / "b", f"model.init_from={hf}", "train.steps=1", "eval.every=1"))
    end_of_first = [r for r in _records(first) if "val/loss" in r][-1]["val/loss"]
    start_of_second = [r for r in _records(second) if "val/loss" in r][0]
    assert start_of_second["step"] == 0
    assert abs(start_of_second["val/loss"] - end_of_first) < 1e-4


def test_diverging_run_stops_with_a_clear_error(corpus, tmp_path):
    from train.trainer import NonFiniteLossError, run
    cfg = _config(corpus, tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "train.steps=10",
                  "eval.every=0", "checkpoint.save_final=false")
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        run(cfg)


def test_profiling_writes_a_chrome_trace_of_the_chosen_steps(corpus, tmp_path):
    from train.trainer import run
    run_dir = run(_config(corpus, tmp_path, "train.steps=4", "eval.every=0", "logging.every=2",
                          "profiling.enable=true", "profiling.start_step=2", "profiling.steps=2",
                          "checkpoint.save_final=false"))
    (trace,) = (run_dir / "profile").glob("*.json")
    assert trace.name == "trace-rank0-steps2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e.get("name") for e in events if str(e.get("name")).startswith("train step")}
    assert steps == {"train step 2", "train step 3"}  # exactly the chosen steps, marked
    assert any("aten::mm" in str(e.get("name")) for e in events)  # and hold the model's work
    train = [r for r in _records(run_dir) if "loss" in r]
    assert all(0 < r["throughput/mfu_pct"] <= 100 for r in train if "throughput/mfu_pct" in r)
    assert all(r["balance/slowest_step_s"] >= r["balance/fastest_step_s"] > 0 for r in train)
