"""CheckpointManager: exact round trips, atomicity, keep-last-k, damage detection, resume modes,
shape checks, and resharding between a single process and 2-rank FSDP2.

Reference for "exact": the state of the model and AdamW that was saved, compared bit for bit with
what a fresh model and optimizer hold after loading (and after one more identical step)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from tests.parallel._mp import run_distributed
from train.checkpoint import MARKER, CheckpointError, CheckpointManager, file_crc32
from train.config import CheckpointConfig, ModelConfig, ParallelConfig
from train.model import build_model, init_model

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                  max_seq_len=64)
BATCH, SEQ = 4, 16
# DCP warns on each single-process save/load that it assumes a single process; so do we.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g),
            torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g))


def _train_step(model, opt, step: int, rows: slice = slice(None)) -> None:
    tokens, targets = _batch(step)
    logits = model(tokens[rows])
    F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _fresh(seed: int, cfg: ModelConfig = CFG):
    model = init_model(build_model(cfg, "cpu"), "cpu", seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _trained(steps: int = 1):
    model, opt = _fresh(seed=0)
    for s in range(steps):
        _train_step(model, opt, s)
    return model, opt


def _flat(model_sd: dict, optim_sd: dict) -> dict[str, torch.Tensor]:
    """Model and optimizer state (from get_state_dict) as one name -> tensor dict."""
    out = {f"model.{k}": v.detach().clone() for k, v in model_sd.items()}
    for fqn, st in optim_sd["state"].items():
        out.update({f"optim.{fqn}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    for i, group in enumerate(optim_sd["param_groups"]):
        out[f"lr.{i}"] = torch.tensor(group["lr"])
    return out


def _state(model, opt) -> dict[str, torch.Tensor]:
    return _flat(*get_state_dict(model, opt))


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def _manager(root: Path, **kw) -> CheckpointManager:
    return CheckpointManager(root, CheckpointConfig(**kw), model_cfg=CFG)


EXTRA = {"train_state": {"step": 3, "tokens_seen": 192}, "data": {"position": 12},
         "torch_rng": torch.get_rng_state().tolist()[:16], "curriculum": {}}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_round_trip_is_exact(tmp_path: Path, async_save: bool) -> None:
    model, opt = _trained(steps=2)
    ck = _manager(tmp_path, async_save=async_save)
    ck.save(3, model, opt, EXTRA)
    saved = _state(model, opt)
    _train_step(model, opt, 2)  # an async save must have copied the state, not referenced it
    ck.wait()
    folder = tmp_path / "step-0000003"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".metadata", MARKER, "__0_0.distcp", "manifest.json", "meta.json"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 3 and meta["model"]["vocab_size"] == 256 and meta["extra"] == EXTRA

    model2, opt2 = _fresh(seed=1)
    loader = _manager(tmp_path)
    assert loader.load(model2, opt2) == EXTRA
    assert loader.folder == folder
    _assert_same(_state(model2, opt2), saved)
    # The restored optimizer continues exactly as the original did.
    model3, opt3 = _fresh(seed=2)
    _manager(tmp_path).load(model3, opt3)
    _train_step(model2, opt2, 2)
    _train_step(model3, opt3, 2)
    _assert_same(_state(model3, opt3), _state(model2, opt2))


def test_keep_last_k_and_leftovers(tmp_path: Path) -> None:
    model, opt = _trained()
    stale = tmp_path / "step-0000009.tmp-deadbeef"  # a save of a run that died
    stale.mkdir(parents=True)
    (stale / MARKER).write_text("9\n")
    ck = _manager(tmp_path, interval=2, keep=2)
    saved = [s for s in range(1, 9) if ck.should_save(s, last=s == 8)]
    assert saved == [2, 4, 6, 8]
    for s in saved:
        ck.save(s, model, opt, {"s": s})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000006", "step-0000008"]
    assert not _manager(tmp_path, interval=0, save_final=False).should_save(8, last=True)
    assert _manager(tmp_path, interval=0).should_save(8, last=True)


def test_incomplete_and_tmp_folders_are_ignored(tmp_path: Path, caplog) -> None:
    model, opt = _trained()
    _manager(tmp_path).save(2, model, opt, {"s": 2})
    half = tmp_path / "step-0000005"  # a later checkpoint whose save never finished
    shutil.copytree(tmp_path / "step-0000002", half)
    (half / MARKER).unlink()
    shutil.copytree(tmp_path / "step-0000002", tmp_path / "step-0000007.tmp-0badc0de")
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        ck = _manager(tmp_path)
        assert ck.load(*_fresh(seed=1)) == {"s": 2}
    assert ck.folder == tmp_path / "step-0000002"
    assert "step-0000005" in caplog.text
    with pytest.raises(CheckpointError, match="step-0000005 is incomplete"):
        _manager(tmp_path, resume="5").load(*_fresh(seed=1))


def _checkpoints_at_2_and_4(tmp_path: Path) -> dict:
    """Save steps 2 and 4 of a short run; returns the state saved at step 2."""
    model, opt = _trained()
    ck = _manager(tmp_path, keep=3)
    ck.save(2, model, opt, {"s": 2})
    want = _state(model, opt)
    _train_step(model, opt, 1)
    ck.save(4, model, opt, {"s": 4})
    return want


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_file"])
def test_damaged_checkpoint_falls_back(tmp_path: Path, caplog, damage: str) -> None:
    want = _checkpoints_at_2_and_4(tmp_path)
    shard = tmp_path / "step-0000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data[len(data) // 3] ^= 0x01
        shard.write_bytes(data)
        assert file_crc32(shard) != json.loads(
            (shard.parent / "manifest.json").read_text())["files"][shard.name]["crc32"]
    else:
        shard.unlink()
    with pytest.raises(CheckpointError, match="step-0000004 is damaged"):
        _manager(tmp_path, resume="4").load(*_fresh(seed=1))
    model2, opt2 = _fresh(seed=1)
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        loader = _manager(tmp_path)
        assert loader.load(model2, opt2) == {"s": 2}
    assert loader.folder.name == "step-0000002"
    assert "step-0000004 is damaged" in caplog.text and "__0_0.distcp" in caplog.text
    _assert_same(_state(model2, opt2), want)
    # The damaged one is moved aside: keep-last-k must not count it as one of the newest.
    assert [p.name for p in tmp_path.glob("*/step-0000004")] == ["step-0000004"]
    assert not (tmp_path / "step-0000004").exists()


def test_resume_modes(tmp_path: Path) -> None:
    want = _checkpoints_at_2_and_4(tmp_path)
    with pytest.raises(CheckpointError, match="step-0000003 does not exist"):
        _manager(tmp_path, resume="3").load(*_fresh(seed=1))

    model2, opt2 = _fresh(seed=1)
    loader = _manager(tmp_path, resume="2")
    assert loader.load(model2, opt2) == {"s": 2}  # exactly that step, though 4 is newer
    _assert_same(_state(model2, opt2), want)
    # This run continues from 2: step 4 is another history, moved aside so that neither
    # keep-last-k nor a later resume=latest mixes it with this run's checkpoints.
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-0000002"]
    assert [p.name for p in tmp_path.glob("superseded-*/step-*")] == ["step-0000004"]

    model3, opt3 = _fresh(seed=1)
    untouched = _state(model3, opt3)
    fresh = _manager(tmp_path, resume="none")
    assert fresh.load(model3, opt3) is None and fresh.folder is None
    _assert_same(_state(model3, opt3), untouched)
    assert not list(tmp_path.glob("step-*"))
    assert sorted(p.name for p in tmp_path.glob("superseded-*/step-*")) == ["step-0000002", "step-0000004"]
    assert _manager(tmp_path).load(*_fresh(seed=1)) is None  # nothing left to resume


def test_model_shape_mismatch_is_refused(tmp_path: Path) -> None:
    model, opt = _trained()
    _manager(tmp_path).save(1, model, opt, {})
    other = ModelConfig(**{**CFG.__dict__, "vocab_size": 512})
    ck = CheckpointManager(tmp_path, CheckpointConfig(), model_cfg=other)
    with pytest.raises(CheckpointError, match=r"model\.vocab_size: checkpoint 256, config 512"):
        ck.load(*_fresh(seed=0, cfg=other))
    wider = ModelConfig(**{**CFG.__dict__, "multiple_of": 64})  # ffn width 176 -> 192
    with pytest.raises(CheckpointError, match=r"feed-forward width .*checkpoint 176, config 192"):
        CheckpointManager(tmp_path, CheckpointConfig(), model_cfg=wider).load(*_fresh(0, wider))


# ---------------------------------------------------------------------------- another layout

def _fsdp_worker(rank: int, world: int, root: str) -> dict:
    """2-rank FSDP2 (the trainer's parallelize): resume the single-process checkpoint, train one
    step on this rank's half of the batch, save. Returns the full state after load and after save."""
    from parallel.dims import ParallelDims
    from parallel.parallelize import parallelize

    pcfg = ParallelConfig(dp_shard=2, tp=1)
    dims = ParallelDims.from_config(pcfg, world)
    dims.build_mesh("cpu")
    model = parallelize(build_model(CFG), dims, pcfg, param_dtype=torch.float32,
                        reduce_dtype=torch.float32)
    init_model(model, "cpu", seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ck = CheckpointManager(root, CheckpointConfig(keep=5), rank=rank, world=world, model_cfg=CFG)
    extra = ck.load(model, opt)
    def full_state() -> dict | None:  # copies, gathered on rank 0
        sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _flat(*sd) if rank == 0 else None

    loaded = full_state()
    half = BATCH // world
    _train_step(model, opt, 1, rows=slice(rank * half, (rank + 1) * half))
    ck.save(2, model, opt, {"from": "fsdp"})
    return {"extra": extra, "loaded": loaded, "after": full_state()}


def test_reshard_single_process_to_fsdp_and_back(tmp_path: Path) -> None:
    model, opt = _trained()
    _manager(tmp_path, keep=5).save(1, model, opt, {"from": "single"})
    out = run_distributed(_fsdp_worker, 2, args=(str(tmp_path),), timeout_s=150)[0]
    assert out["extra"] == {"from": "single"}
    _assert_same(out["loaded"], _state(model, opt))

    meta = json.loads((tmp_path / "step-0000002" / "meta.json").read_text())
    assert meta["layout"] == {"world_size": 2, "mesh": {"dp_shard": 2}}
    model2, opt2 = _fresh(seed=1)
    assert _manager(tmp_path).load(model2, opt2) == {"from": "fsdp"}
    _assert_same(_state(model2, opt2), out["after"])


def test_export_run_writes_the_checkpoint_weights(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from train.config import Config, DataConfig, to_dict
    from train.export import export_run
    from train.hf import load_hf_state_dict

    run = tmp_path / "run"
    cfg = Config(model=CFG, data=DataConfig(seq_len=32))
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    model, opt = _trained()
    ck = _manager(run / "checkpoints", keep=3)
    ck.save(1, model, opt, {})
    want = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, opt, 1)
    ck.save(2, model, opt, {})

    out = export_run(run, tmp_path / "hf", step=1, dtype=torch.float32)
    got = load_hf_state_dict(out, CFG)
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k].float(), v), k
    with pytest.raises(CheckpointError, match="step-0000003 does not exist"):
        export_run(run, tmp_path / "hf3", step=3)


def _stale_listing_worker(rank: int, world: int, root: str) -> dict:
    """Rank 1 lists the folder as a stale network-file-system view would: without the newest
    checkpoint. Rank 0's choice must win on every rank."""
    import train.checkpoint as checkpoint
    if rank == 1:
        listed = checkpoint.list_step_dirs
        checkpoint.list_step_dirs = lambda folder: [s for s in listed(folder) if s[0] != 2]
    model, opt = _fresh(seed=7)
    ck = CheckpointManager(root, CheckpointConfig(keep=5), rank=rank, world=world, model_cfg=CFG)
    extra = ck.load(model, opt)
    return {"extra": extra, "folder": ck.folder.name, "state": _state(model, opt)}


def test_ranks_resume_the_checkpoint_rank0_chose_whatever_their_own_listing(tmp_path: Path) -> None:
    model, opt = _trained(1)
    ck = _manager(tmp_path, keep=5)
    ck.save(1, model, opt, {"step": 1})
    _train_step(model, opt, 1)
    ck.save(2, model, opt, {"step": 2})
    out = run_distributed(_stale_listing_worker, 2, args=(str(tmp_path),), timeout_s=120)
    assert [o["folder"] for o in out] == ["step-0000002", "step-0000002"]
    assert [o["extra"] for o in out] == [{"step": 2}, {"step": 2}]
    for o in out:
        _assert_same(o["state"], _state(model, opt))
