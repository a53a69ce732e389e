"""End to end through `python -m train` / torchrun: the parallel layout does not change training.

With the same global batch (the loader cuts global batch k the same way whatever the number of
data-parallel ranks), layer dropout in `global` mode (decisions by global sample index) and rank 0
initialising the model and broadcasting it (CPU), ten steps of LayerSkip training (per-sample layer
dropout + rotational early exits, attention masked at document boundaries) must give the same
per-step losses, per-exit losses and gradient norms in every layout, up to the rounding of the
gradient reductions (< 1e-4 in fp32):
  one process, batch 8  ==  FSDP over 4 ranks, batch 2  ==  FSDP 2 x TP 2, batch 4
                        ==  2 "nodes" (two torchrun agents, c10d rendezvous) x 2 ranks, batch 2.
(DDP replicas train as FSDP ranks do: tests/train/test_resume.py resumes an FSDP run on 2 DDP
replicas and checks ten more LayerSkip steps against the FSDP run; tests/parallel/
test_parallelize.py checks DDP's and HSDP's gradients against one process.)
Also: a step where one rank drops every one of its samples from a block while another rank keeps
some (the FSDP2 hang when one rank skips a block another runs) completes and matches one process; and impossible layouts
fail at start-up with a message naming the setting.

Every launch runs under a hard timeout and is killed with its workers on expiry (tests/_launch.py).
Cost on 2 cores: each rank spends ~10 s of CPU importing torchtitan, so a 4-rank launch takes ~40 s
(training itself ~5 s); the one-process references run side by side.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from tests._launch import (compose_config, free_port, prepare_data, read_metrics, run, start,
                           torchrun_cmd, train_cmd, wait_all)

pytestmark = pytest.mark.slow

STEPS = 10
TOL = 1e-4  # fp32 on CPU; the layouts differ only in how gradients are summed
# A tiny Llama (tp=2 divides heads 4, kv heads 2, FFN width 176, vocab 512 and seq_len 32).
TINY = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
        "model.vocab_size=512", "model.multiple_of=16", "model.max_seq_len=128",
        "model.attention=block_causal",  # the Llama 3 recipes' setting; windows hold several documents
        "data.seq_len=32", "train.seed=0", f"train.steps={STEPS}",
        "optim.warmup_steps=2", "eval.every=0", "eval.batches=1", "logging.every=1",
        "logging.tensorboard=false", "checkpoint.interval=0", "checkpoint.save_final=false"]
# LayerSkip on: dropout decided per global sample, an exit at every other layer (rotating).
LAYERSKIP = ["layerskip.dropout.mode=global", "layerskip.exit.exits='1:'",
             "layerskip.exit.curriculum=rotational", "layerskip.exit.period=2"]
P_MAX = ["layerskip.dropout.p_max=0.3"]  # rates 0, .08, .18, .3 (paper's exp depth scale)
# Test 2: block 2 drops a sample with probability 0.7; 2 ranks x 2 samples. With seed 0 one rank
# drops both its samples while the other keeps one at steps 1, 6, 8, 9 (checked below).
ONE_HOT_RATES = ["layerskip.dropout.rates=[0.0,0.0,0.7,0.0]"]
HOT_LAYER = 2

ONE_PROCESS_S, MULTI_PROCESS_S = 150, 240  # hard timeouts (normal: ~15 s and ~45 s)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Three standard-library sources as a corpus (~200 kB, ~2800 sequences of 33 tokens), each
    paragraph (text between blank lines) a document, so that windows hold several documents and
    attention is masked at their boundaries; tokenizer trained and tokens packed once, here."""
    folder = tmp_path_factory.mktemp("layouts")
    (folder / "corpus").mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse", "difflib", "textwrap"):
        paragraphs = [p for p in (stdlib / f"{name}.py").read_text().split("\n\n") if p.strip()]
        (folder / "corpus" / f"{name}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    data = [f"data.source={folder / 'corpus'}", f"data.cache_dir={folder / 'cache'}"]
    prepare_data([*TINY, *data])
    return {"cwd": folder, "data": data}


def _overrides(corpus: dict, run_dir: Path, batch: int, *extra: str) -> list[str]:
    return [*TINY, *corpus["data"], *LAYERSKIP, f"run_dir={run_dir}", f"data.batch_size={batch}",
            *extra]


@pytest.fixture(scope="module")
def one_process(corpus) -> dict[str, Path]:
    """The one-process references of both configurations (global batch 8 with p_max; global batch
    4 with the hot block), started side by side: each uses one of the two cores."""
    cwd = corpus["cwd"]
    runs = {"p_max": (cwd / "one-p_max", 8, P_MAX), "hot": (cwd / "one-hot", 4, ONE_HOT_RATES)}
    launches = [start(train_cmd(_overrides(corpus, d, batch, *extra)), cwd)
                for d, batch, extra in runs.values()]
    for done in wait_all(launches, ONE_PROCESS_S):
        done.check()
    return {name: d for name, (d, _, _) in runs.items()}


def _assert_same_training(reference: Path, other: Path, tol: float = TOL) -> float:
    """Every step is logged in both, and the total loss, each active exit's loss, the gradient
    norm and the final validation loss agree within `tol`. Returns the largest difference."""
    ref, got = read_metrics(reference), read_metrics(other)
    assert sorted(ref) == list(range(1, STEPS + 1)), f"reference logged steps {sorted(ref)}"
    assert sorted(got) == sorted(ref), f"{other.name} logged steps {sorted(got)}"
    worst, rows = 0.0, []
    for step in sorted(ref):
        keys = sorted(k for k in ref[step] if k.startswith("loss/") or k in ("grad_norm", "val/loss"))
        assert keys == sorted(k for k in got[step] if k.startswith("loss/") or k in ("grad_norm", "val/loss")), \
            f"step {step}: different metrics logged"
        for k in keys:
            diff = abs(got[step][k] - ref[step][k])
            worst = max(worst, diff)
            if diff > tol:
                rows.append(f"step {step} {k}: {ref[step][k]:.6f} vs {got[step][k]:.6f} (diff {diff:.2e})")
    assert not rows, f"{other.name} differs from one process:\n" + "\n".join(rows)
    return worst


def test_reference_really_uses_layerskip(one_process) -> None:
    """Guards the comparisons below against comparing runs in which nothing LayerSkip-specific
    happened: layers were dropped, and the exits rotate (two exits on alternate steps)."""
    steps = read_metrics(one_process["p_max"])
    dropped = [steps[s]["layerskip/drop_fraction/block_04"] for s in steps]
    assert max(dropped) > 0 and min(dropped) < 1
    exits = [sorted(k[len("loss/exit_"):] for k in steps[s] if k.startswith("loss/exit_")) for s in (1, 2)]
    assert exits == [["01", "03", "04"], ["02", "04"]]  # exits E = blocks run; E = 4 the full model


LAYOUTS = {  # name -> (ranks, batch per data-parallel rank, extra overrides)
    "fsdp4": (4, 2, []),
    "fsdp2_tp2": (4, 4, ["parallel.tp=2"]),
    "two_nodes_x2": (4, 2, []),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(layout: str, corpus, one_process, tmp_path: Path) -> None:
    ranks, batch, extra = LAYOUTS[layout]
    run_dir = tmp_path / layout
    overrides = _overrides(corpus, run_dir, batch, *P_MAX, *extra)
    if layout == "two_nodes_x2":
        # Two torchrun agents, as on two machines: one rendezvous, one shared run directory.
        endpoint = f"localhost:{free_port()}"
        launches = [start(torchrun_cmd(overrides, nproc=2, nnodes=2, node_rank=node,
                                       rdzv_endpoint=endpoint, rdzv_id=f"layouts-{endpoint}"), corpus["cwd"])
                    for node in (0, 1)]
        for done in wait_all(launches, MULTI_PROCESS_S):
            done.check()
    else:
        run(torchrun_cmd(overrides, nproc=ranks), corpus["cwd"], MULTI_PROCESS_S)
    worst = _assert_same_training(one_process["p_max"], run_dir)
    print(f"{layout}: largest difference from one process {worst:.2e}")


def test_rank_dropping_a_whole_block_matches_one_process(corpus, one_process, tmp_path: Path) -> None:
    """In global mode a rank can drop all its samples of a block while another keeps some. The
    empty rank must still take part in that block's FSDP collectives (no hang), and the result
    must be the one-process result."""
    ranks, batch = 2, 2
    run_dir = tmp_path / "fsdp2-hot"
    overrides = _overrides(corpus, run_dir, batch, *ONE_HOT_RATES)

    # The run's own dropout decisions, drawn as the trainer draws them on each data-parallel rank.
    from train.layerskip.dropout import LayerDropout
    cfg = compose_config(overrides)
    plans = [LayerDropout(cfg.layerskip.dropout, n_layers=cfg.model.n_layers, total_steps=STEPS,
                          seed=cfg.train.seed, dp_rank=r, dp_degree=ranks) for r in range(ranks)]
    lopsided = [step for step in range(STEPS)
                if len({bool(p.dropped_mask(step, 0, batch)[HOT_LAYER].all()) for p in plans}) == 2]
    assert lopsided, "no step where one rank drops all its samples of the hot block and another does not"

    run(torchrun_cmd(overrides, nproc=ranks), corpus["cwd"], MULTI_PROCESS_S)
    worst = _assert_same_training(one_process["hot"], run_dir)
    print(f"fsdp2 with one-sided empty block at steps {lopsided}: largest difference {worst:.2e}")


INVALID = {  # name -> (ranks, overrides, message)
    "tp_does_not_divide_world": (3, ["parallel.tp=2"], "parallel.tp=2 does not divide the world size 3"),
    "tp_does_not_divide_heads": (3, ["parallel.tp=3"], "parallel.tp=3 does not divide model.n_heads=4"),
}


def test_invalid_layouts_fail_at_start_up(corpus, tmp_path: Path) -> None:
    """Both launched together (each fails on its own); the collective timeout stays at its
    default 300 s, so a rank left waiting on a peer would show up as a hard-timeout failure here,
    not as a quick exit."""
    launches = [start(torchrun_cmd(_overrides(corpus, tmp_path / name, 2, *extra), nproc=ranks),
                      corpus["cwd"]) for name, (ranks, extra, _) in INVALID.items()]
    results = wait_all(launches, 120)
    for (name, (_, _, message)), done in zip(INVALID.items(), results):
        assert done.returncode != 0, f"{name}: exited 0:\n{done.output[-3000:]}"
        assert message in done.output, f"{name}: no {message!r} in:\n{done.output[-3000:]}"
        assert "INFO train: step" not in done.output, f"{name}: training started:\n{done.output[-3000:]}"
