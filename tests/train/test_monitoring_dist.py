"""Stability and monitoring on 2 gloo ranks, through the trainer's own loop (FSDP2 over 2 ranks,
LayerSkip on, the quickstart experiment shrunk in size and steps):

- a corrupted batch on one rank is a loss spike that every rank skips (monitor.spike=skip, the
  window shrunk to the run's length): no update, the same step again on the next batch, so the
  run's parameters and every later loss equal those of a run whose data never held that batch;
  the skip is counted in the metrics and saved, with the window, in the checkpoint;
- a sleep injected into one rank's forward names that rank as the straggler.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from tests.parallel._mp import run_distributed

STEPS, BAD = 14, 11  # the 11th batch is corrupted on rank 1 (after a full window of 8 steps)
SLOW_RANK, SLEEP_S = 1, 0.05


def _overrides(corpus: Path, run_dir: Path) -> list[str]:
    return ["experiment=quickstart", "model.n_layers=4", "model.dim=64", "model.n_heads=4",
            "model.n_kv_heads=2", "model.vocab_size=512", "model.multiple_of=16", "model.max_seq_len=64",
            f"data.source={corpus / 'corpus.txt'}", f"data.cache_dir={corpus / 'cache'}",
            "data.seq_len=32", "data.batch_size=4", "data.val_fraction=0.25", "eval.every=0",
            "eval.batches=1", "logging.every=1", "logging.tensorboard=false", "optim.warmup_steps=2",
            "checkpoint.interval=0", f"train.steps={STEPS}", "monitor.spike=skip",
            "monitor.spike_window=8", f"run_dir={run_dir}"]


class _Edited:
    """The train loader with its `bad`-th batch (from 1) corrupted on `corrupt_rank` (every label
    the vocabulary's last token: a batch unlike the text), or dropped on every rank."""

    def __init__(self, loader, rank: int, bad: int, corrupt_rank: int | None, drop: bool):
        self.loader, self.rank, self.bad, self.corrupt_rank, self.drop = loader, rank, bad, corrupt_rank, drop

    def __iter__(self):
        for i, (inputs, labels) in enumerate(self.loader, start=1):
            if i == self.bad and self.drop:
                continue
            if i == self.bad and self.rank == self.corrupt_rank:
                labels = torch.full_like(labels, 511)
            yield inputs, labels

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _train(rank: int, overrides: list[str], corrupt: bool, slow: bool) -> dict:
    from parallel.distributed import init_distributed
    from tests._launch import compose_config
    from train.trainer import build_run, resume, train_loop

    cfg = compose_config(overrides)
    rank, world, _, device = init_distributed(cfg.parallel.timeout_s, "cpu")
    r = build_run(cfg, rank, world, device)
    resume(r)
    r.data.train = _Edited(r.data.train, rank, BAD, corrupt_rank=1 if corrupt else None, drop=not corrupt)
    if slow and rank == SLOW_RANK:  # inside the block's forward, as a slow device would be
        r.model.layers["0"].register_forward_pre_hook(lambda module, args: time.sleep(SLEEP_S))
    train_loop(r)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in r.model.named_parameters()}
    return {"params": params, "spikes": r.spikes.state_dict()}


def _worker(rank: int, world: int, corpus: Path, tmp: Path) -> dict:
    return {"skipped": _train(rank, _overrides(corpus, tmp / "skipped"), corrupt=True, slow=True),
            "without": _train(rank, _overrides(corpus, tmp / "without"), corrupt=False, slow=False)}


def _records(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ("the early exit of a layer skips blocks when the model is sure of the next token "
             "and dropout of layers makes the later blocks robust to missing inputs").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 18))) + "." for _ in range(4000)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    from tests._launch import prepare_data
    prepare_data(_overrides(root, root / "unused"))  # the tokenizer once, before the ranks start
    return root


def test_spike_on_one_rank_is_skipped_by_every_rank_and_stragglers_are_named(corpus, tmp_path):
    out = run_distributed(_worker, 2, args=(corpus, tmp_path), timeout_s=600)
    skipped, without = _records(tmp_path / "skipped"), _records(tmp_path / "without")
    # every rank skipped the same step: the ranks' parameters agree, and equal the run without it
    for name, p in out[0]["skipped"]["params"].items():
        torch.testing.assert_close(out[1]["skipped"]["params"][name], p, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(out[0]["without"]["params"][name], p, rtol=0, atol=0, msg=name)
    assert sorted(skipped) == sorted(without) == list(range(1, STEPS + 1))
    assert [skipped[s]["loss"] for s in skipped] == [without[s]["loss"] for s in without]
    assert skipped[STEPS]["spike/skipped"] == 1 and skipped[BAD - 1]["spike/skipped"] == 0
    assert without[STEPS]["spike/skipped"] == 0
    # the window and counters are the checkpoint's (the final save), the same on every rank
    meta = json.loads((tmp_path / "skipped" / "checkpoints" / f"step-{STEPS:07d}" / "meta.json").read_text())
    assert meta["extra"]["spikes"] == out[0]["skipped"]["spikes"] == out[1]["skipped"]["spikes"]
    assert meta["extra"]["spikes"]["skipped"] == 1
    # the slow rank is named at every logged step; without the sleep nothing makes it slower
    assert {rec["straggler/rank"] for rec in skipped.values()} == {SLOW_RANK}
    assert all(rec["straggler/compute_s"] >= SLEEP_S for rec in skipped.values())
