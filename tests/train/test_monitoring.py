"""Monitoring and stability pieces, one process each: the spike detector's verdicts and its exact
resume, the straggler figures, the garbage-collection schedule, the flight recorder's settings,
the W&B run id's choice, the new settings' checks and where their documentation lives."""
from __future__ import annotations

import gc
import json
import random
import re
from pathlib import Path

import pytest

from train.config import Config, ConfigError, LoggingConfig, MonitorConfig
from train.spikes import OK, SKIP, WARN, SpikeDetector

ROOT = Path(__file__).resolve().parents[2]


def _noisy(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [3.0 + 0.01 * rng.gauss(0, 1) for _ in range(n)]


def _defaults() -> SpikeDetector:
    m = MonitorConfig()
    return SpikeDetector("skip", m.spike_sigma, m.spike_window, m.spike_max_skips)


def test_a_spike_is_judged_against_a_full_window_of_accepted_steps() -> None:
    d = _defaults()
    window = MonitorConfig().spike_window
    assert d.check(100.0, 1.0) == OK  # warming up: nothing to compare with yet
    for loss in _noisy(window - 1):
        assert d.check(loss, 1.0) == OK
    d = _defaults()
    for loss in _noisy(window):
        d.check(loss, 1.0 + 0.01 * random.Random(int(loss * 1e6)).random())
    assert d.check(3.02, 1.0) == OK  # 2 sigma: ordinary noise
    assert d.check(3.5, 1.0) == SKIP  # 50 sigma above the window's loss
    assert d.check(3.0, 50.0) == SKIP  # the gradient norm alone
    assert (d.detected, d.skipped) == (2, 2)
    assert d.check(3.0, 1.0) == OK and d.consecutive == 0


def test_warn_applies_and_off_never_judges() -> None:
    warn, off = SpikeDetector("warn", 6.0, 8, 5), SpikeDetector("off", 6.0, 8, 5)
    for loss in _noisy(8):
        warn.check(loss, 1.0)
        off.check(loss, 1.0)
    assert warn.check(10.0, 1.0) == WARN and warn.detected == 1 and warn.skipped == 0
    assert warn.loss[-1] == 10.0  # applied: part of the window now
    assert off.check(10.0, 1.0) == OK and off.metrics() == {}


def test_a_lasting_new_level_is_accepted_after_max_skips() -> None:
    d = SpikeDetector("skip", 6.0, 8, max_skips=2)
    for loss in _noisy(8):
        d.check(loss, 1.0)
    assert [d.check(5.0, 1.0) for _ in range(3)] == [SKIP, SKIP, WARN]
    assert list(d.loss) == [5.0]  # the window restarts at the new level


def test_window_and_counters_resume_exactly_through_json() -> None:
    a = SpikeDetector("skip", 6.0, 16, 5)
    values = _noisy(40, seed=3)
    for i, loss in enumerate(values[:20]):
        a.check(loss if i != 18 else 9.0, 1.0)
    b = SpikeDetector("skip", 6.0, 16, 5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # as the checkpoint stores it
    assert b.state_dict() == a.state_dict()
    assert [a.check(v, 1.0) for v in values[20:]] == [b.check(v, 1.0) for v in values[20:]]
    assert a.state_dict() == b.state_dict() and a.skipped == 1


def test_straggler_is_the_rank_that_computes_longest() -> None:
    from train.stragglers import straggler_metrics
    m = straggler_metrics([0.10, 0.10, 0.15, 0.11])
    assert m["straggler/rank"] == 2 and m["straggler/compute_s"] == 0.15
    assert m["straggler/excess_pct"] == pytest.approx(50.0)  # against the (lower) median, 0.10


def test_compute_timer_times_block_forwards_only_when_training(tiny_model_cfg) -> None:
    import time

    import torch

    from train.model import build_model, init_model
    from train.stragglers import ComputeTimer
    model = init_model(build_model(tiny_model_cfg, "cpu"), "cpu", 0)
    timer = ComputeTimer(model, torch.device("cpu"))
    model.layers["2"].register_forward_pre_hook(lambda m, a: time.sleep(0.05))
    tokens = torch.randint(0, tiny_model_cfg.vocab_size, (2, 8))
    model(tokens)
    assert timer.take() >= 0.05 and timer.take() == 0.0  # take() resets
    with torch.no_grad():  # validation is not this rank's training work
        model(tokens)
    assert timer.take() == 0.0
    timer.close()


def test_garbage_is_collected_on_schedule_only() -> None:
    from train.gc_control import GarbageCollection
    was = gc.isenabled()
    collector = GarbageCollection(every=MonitorConfig().gc_every)
    try:
        assert not gc.isenabled()
        before = gc.get_stats()[1]["collections"]
        collector.step(MonitorConfig().gc_every - 1)
        assert gc.get_stats()[1]["collections"] == before
        collector.step(MonitorConfig().gc_every)
        assert gc.get_stats()[1]["collections"] == before + 1
    finally:
        collector.close()
    assert gc.isenabled() == was


def test_flight_recorder_is_set_unless_the_environment_chose(monkeypatch) -> None:
    from train.flight_recorder import configure_flight_recorder
    for var in ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    got = configure_flight_recorder(MonitorConfig().nccl_trace_buffer)
    assert got == {"TORCH_NCCL_TRACE_BUFFER_SIZE": "20000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")  # a launcher's choice wins
    assert configure_flight_recorder(20000)["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000"


def test_wandb_run_id_follows_the_checkpoint(tmp_path) -> None:
    from train.wandb_sink import ID_FILE, choose_run_id
    assert choose_run_id(tmp_path, "fromckpt", resumed=True) == "fromckpt"
    (tmp_path / ID_FILE).write_text(json.dumps({"run_id": "stored"}))
    assert choose_run_id(tmp_path, None, resumed=True) == "stored"  # a checkpoint saved without W&B
    fresh = choose_run_id(tmp_path, None, resumed=False)  # step 0: a new W&B run
    assert fresh not in ("stored", "fromckpt") and re.fullmatch(r"[a-z0-9]+", fresh)


@pytest.mark.parametrize("section,key,value", [
    ("monitor", "spike", "skip-all"), ("monitor", "spike_sigma", 0.0), ("monitor", "spike_window", 1),
    ("monitor", "gc_every", -1), ("monitor", "nccl_trace_buffer", -5),
    ("logging", "block_grad_norms_every", -1),
])
def test_bad_settings_name_their_key(section: str, key: str, value) -> None:
    cfg = Config()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        cfg.validate()


def test_every_metric_key_and_setting_is_documented() -> None:
    page = (ROOT / "docs" / "metrics.md").read_text()
    for key in ("loss/final", "spike/detected", "spike/skipped", "spike/loss_zscore", "spike/grad_norm_zscore",
                "straggler/rank", "straggler/compute_s", "straggler/median_compute_s",
                "straggler/fastest_compute_s", "straggler/excess_pct", "grad_norm/block_"):
        assert f"`{key}" in page, key
    for name in vars(MonitorConfig()):
        assert f"monitor.{name}" in page, name
    for name in ("wandb", "wandb_project", "wandb_entity", "block_grad_norms_every", "stragglers"):
        assert f"logging.{name}" in page, name
    assert "## What to do with a spike or a straggler" in page
    assert LoggingConfig().wandb is False  # off by default
