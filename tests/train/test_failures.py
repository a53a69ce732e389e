"""Clear failures: a full disk stops a checkpoint save with a message naming the folder and both
sizes and leaves the previous checkpoint loadable; a bad data file is one clean line naming file
and line (exit 2, no traceback), like a configuration error; MFU is never shown above 100 %; the
per-rank balance picks the slowest and the fastest rank."""
from __future__ import annotations

import logging
import re
import sys

import pytest
import torch

import train.checkpoint as checkpoint
from train.checkpoint import CheckpointError, CheckpointManager
from train.config import CheckpointConfig, ModelConfig
from train.metrics import mfu_pct, rank_balance
from train.model import build_model, init_model

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                  max_seq_len=64)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def test_full_disk_stops_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = init_model(build_model(CFG, "cpu"), "cpu", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = CheckpointManager(tmp_path / "ckpt", CheckpointConfig(), model_cfg=CFG)
    ckpt.save(1, model, opt, {"step": 1})
    size = sum(p.stat().st_size for p in (tmp_path / "ckpt" / "step-0000001").iterdir())
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1234)  # a disk with 1.2 KB left
    with pytest.raises(CheckpointError) as err:
        ckpt.save(2, model, opt, {"step": 2})
    message = str(err.value)
    assert str(tmp_path / "ckpt") in message and "1.2 KB free" in message
    assert "step-0000001" in message and re.search(r"takes \d+\.\d MB", message), message
    assert abs(float(re.search(r"takes (\d+\.\d) MB", message).group(1)) * 1e6 - size) < 0.2e6
    assert not list((tmp_path / "ckpt").glob("step-0000002*"))  # nothing half-written left
    monkeypatch.undo()
    fresh = init_model(build_model(CFG, "cpu"), "cpu", 1)
    extra = CheckpointManager(tmp_path / "ckpt", CheckpointConfig(), model_cfg=CFG).load(
        fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
    assert extra == {"step": 1}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_disk_filling_up_during_the_write_is_named(tmp_path, monkeypatch):
    """The space check passed, but the disk filled up while DCP wrote (another job, a log...)."""
    model = init_model(build_model(CFG, "cpu"), "cpu", 0)
    ckpt = CheckpointManager(tmp_path / "ckpt", CheckpointConfig(), model_cfg=CFG)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(checkpoint.dcp, "save", full)
    with pytest.raises(CheckpointError, match="disk filled up while saving checkpoint step 1"):
        ckpt.save(1, model, None, {})
    assert not list((tmp_path / "ckpt").glob("step-*"))


def test_bad_data_file_is_one_clean_line(tmp_path, monkeypatch, capsys):
    """`python -m train` (its Hydra main, called here in-process) on a bad .jsonl line: exit 2 and
    one ERROR line naming file and line, no traceback."""
    from hydra.core.global_hydra import GlobalHydra

    import train.__main__ as entry
    from train.config import register_schemas
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    register_schemas()
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["train", f"data.source={bad}", f"data.cache_dir={tmp_path / 'cache'}",
                                      f"run_dir={tmp_path / 'run'}", "train.steps=1"])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as exit_:
            entry.main()
    finally:  # the entry point configures logging for its process; give pytest's back
        root.handlers[:] = handlers
        root.setLevel(level)
    output = capsys.readouterr().err
    assert exit_.value.code == 2, output[-3000:]
    errors = [l for l in output.splitlines() if " ERROR " in l]
    assert len(errors) == 1 and "data error:" in errors[0] and f"{bad}:2" in errors[0], output[-3000:]
    assert "Traceback" not in output


def test_mfu_above_100_percent_is_not_shown():
    assert mfu_pct(flops=50.0, seconds=1.0, world=1, peak=100.0) == 50.0
    assert mfu_pct(flops=155.3, seconds=1.0, world=1, peak=100.0) is None
    assert mfu_pct(flops=150.0, seconds=1.0, world=2, peak=100.0) == 75.0


def test_rank_balance_names_the_slowest_and_fastest_rank():
    b = rank_balance(step_s=[0.30, 0.45, 0.20, 0.31], kept=[0.9, 0.7, 1.0, 0.8])
    assert (b["balance/slowest_rank"], b["balance/slowest_step_s"], b["balance/slowest_kept"]) == (1, 0.45, 0.7)
    assert (b["balance/fastest_rank"], b["balance/fastest_step_s"], b["balance/fastest_kept"]) == (2, 0.20, 1.0)
    assert (b["balance/kept_min"], b["balance/kept_max"]) == (0.7, 1.0)
