"""Tied embeddings stay tied: one matrix for the token embedding and the output head, through
import, training (one process and FSDP2 x TP2), checkpoints and export; untied stays untied."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from tests.train._models import one_thread  # noqa: E402,F401
from train.config import ModelConfig  # noqa: E402
from train.hf import export_hf, load_hf_model  # noqa: E402
from train.layerskip.exit_loss import make_exit_loss  # noqa: E402
from train.model import build_model, init_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
TIED = dataclasses.replace(CFG, tie_embeddings=True)


@pytest.mark.usefixtures("one_thread")
def test_shared_gradient_is_the_sum_of_both_uses():
    """The tied matrix's gradient is the embedding's plus the head's (with an early exit, so the
    head is used twice), as an untied twin with equal weights computes them separately."""
    tied = init_model(build_model(TIED), "cpu", 0)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert "output.weight" not in tied.state_dict() and len(list(tied.parameters())) == len(tied.state_dict())
    untied = build_model(CFG, "cpu")
    untied.load_state_dict({**tied.state_dict(), "output.weight": tied.tok_embeddings.weight.detach().clone()})
    g = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, CFG.vocab_size, (2, 16), generator=g) for _ in range(2))
    for model in (tied, untied):
        out = model(tokens, capture=[1], loss_fn=make_exit_loss(labels, {1: 0.3, 3: 0.7}, chunk_tokens=8))
        out.loss.backward()
    both = untied.tok_embeddings.weight.grad + untied.output.weight.grad
    torch.testing.assert_close(tied.tok_embeddings.weight.grad, both, atol=1e-6, rtol=1e-5)
    for name, p in tied.named_parameters():
        if name != "tok_embeddings.weight":
            torch.testing.assert_close(p.grad, untied.get_parameter(name).grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    """A tiny Llama 3.2-shaped checkpoint with tied embeddings, written by transformers."""
    from tests.train._llama3 import write_tiny_llama3
    text = Path(ROOT, "train/model.py").read_text() + Path(ROOT, "train/hf.py").read_text()
    return write_tiny_llama3(tmp_path_factory.mktemp("tied") / "hf", text)


def _assert_tied_export(out: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    return tensors


def test_tied_checkpoint_round_trips_through_training_in_every_layout(tmp_path, tied_dir):
    """`python -m train model=hf model.init_from=TIED` for 2 steps with an early exit, in one
    process and under torchrun FSDP2 x TP2; each run's checkpoint (saved by 1 or 4 ranks) is
    exported from one process: one matrix, equal in both layouts, loaded by transformers as a
    tied model whose logits are ours."""
    import transformers

    from tests._launch import read_metrics, start, torchrun_cmd, train_cmd, wait_all
    from train.export import export_run, load_run_config
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(Path(ROOT, f).read_text() for f in ("train/trainer.py", "train/checkpoint.py")))
    common = ["model=hf", f"model.init_from={tied_dir}", "data=files", f"data.source={corpus}",
              "data.seq_len=32", "data.val_fraction=0.1", "train.steps=2",
              "layerskip.exit.exits=1:", "layerskip.exit.period=2", "layerskip.dropout.p_max=0",
              "eval.every=0", "eval.batches=1", "logging.every=1", "logging.tensorboard=false",
              "checkpoint.interval=0", "checkpoint.async=false", "optim.warmup_steps=1"]
    layouts = {"one": (train_cmd, 1, ["data.batch_size=4"]),
               "fsdp2xtp2": (torchrun_cmd, 4, ["data.batch_size=2", "parallel.dp_shard=2", "parallel.tp=2"])}
    launches = []
    for name, (cmd, nproc, extra) in layouts.items():
        overrides = [*common, *extra, f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / name / 'cache'}"]
        launches.append(start(cmd(overrides) if nproc == 1 else cmd(overrides, nproc=nproc), tmp_path))
    for done in wait_all(launches, timeout_s=240):
        done.check()
    original = load_file(tied_dir / "model.safetensors")
    exported = {}
    for name in layouts:
        assert load_run_config(tmp_path / name).model.tie_embeddings is True  # read from config.json
        out = export_run(tmp_path / name, tmp_path / f"export-{name}", dtype=torch.float32)
        exported[name] = _assert_tied_export(out)
    one, sharded = exported["one"], exported["fsdp2xtp2"]
    assert one.keys() == sharded.keys() == original.keys() - {"lm_head.weight"}
    assert not torch.equal(one["model.embed_tokens.weight"], original["model.embed_tokens.weight"])  # trained
    # AdamW's first steps move every weight by about lr whatever the gradient's size, so a
    # gradient within rounding of 0 may move either way: compare the mean difference with the move.
    for k in one:
        moved = (one[k] - original[k]).abs().mean()
        assert (sharded[k] - one[k]).abs().mean() < 0.01 * moved, k
    losses = {name: [r["loss"] for _, r in sorted(read_metrics(tmp_path / name).items())] for name in layouts}
    assert losses["fsdp2xtp2"] == pytest.approx(losses["one"], rel=1e-6)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "export-one")).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ours, cfg = load_hf_model(tmp_path / "export-one")
    assert cfg.tie_embeddings and ours.output.weight is ours.tok_embeddings.weight
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.usefixtures("one_thread")
def test_untied_stays_untied_and_a_tied_checkpoint_can_be_untied(tmp_path, tied_dir):
    import transformers

    from tests.train._models import random_model
    from train.hf import check_hf_config, load_hf_state_dict, read_hf_config
    from train.config import ConfigError
    # Untied: two matrices in, two out; transformers loads two.
    model = random_model(CFG)
    out = export_hf(model.state_dict(), CFG, tmp_path / "untied", None, torch.float32)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    back, cfg = load_hf_model(out)
    assert not cfg.tie_embeddings and back.output.weight is not back.tok_embeddings.weight
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    # An untied checkpoint cannot be trained tied (two different matrices)...
    with pytest.raises(ConfigError, match=r"model\.tie_embeddings = True but .*tie_word_embeddings false"):
        check_hf_config(TIED, out)
    # ... a tied one can be trained untied: the head starts as a copy of the embedding.
    shape = read_hf_config(tied_dir)
    untie = ModelConfig(**{**shape, "tie_embeddings": False})
    sd = load_hf_state_dict(tied_dir, untie)
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    assert sd["output.weight"].data_ptr() != sd["tok_embeddings.weight"].data_ptr()
    assert "output.weight" not in load_hf_state_dict(tied_dir, ModelConfig(**shape))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_tied_checkpoint_resumes_exactly_with_one_matrix(tmp_path):
    """Model and AdamW state of a tied model: saved once, restored exactly, and training goes on
    as it would have."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from train.checkpoint import CheckpointManager
    from train.config import CheckpointConfig

    def fresh(seed):
        model = init_model(build_model(TIED, "cpu"), "cpu", seed)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def step(model, opt, i):
        g = torch.Generator().manual_seed(i)
        tokens, labels = (torch.randint(0, CFG.vocab_size, (2, 16), generator=g) for _ in range(2))
        model(tokens, capture=[1], loss_fn=make_exit_loss(labels, {1: 0.3, 3: 0.7}, 16)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def state(model, opt):
        msd, osd = get_state_dict(model, opt)
        return {**{f"m.{k}": v.clone() for k, v in msd.items()},
                **{f"o.{k}.{n}": torch.as_tensor(t).clone() for k, s in osd["state"].items() for n, t in s.items()}}

    model, opt = fresh(0)
    step(model, opt, 0)
    CheckpointManager(tmp_path, CheckpointConfig(), model_cfg=TIED).save(1, model, opt, {})
    saved = state(model, opt)
    assert "m.output.weight" not in saved and "m.tok_embeddings.weight" in saved
    restored, opt2 = fresh(1)
    CheckpointManager(tmp_path, CheckpointConfig(), model_cfg=TIED).load(restored, opt2)
    assert restored.output.weight is restored.tok_embeddings.weight
    got = state(restored, opt2)
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    step(model, opt, 1)
    step(restored, opt2, 1)
    torch.testing.assert_close(restored.tok_embeddings.weight, model.tok_embeddings.weight, atol=0, rtol=0)
    # An untied model is another shape: refused naming the setting.
    from train.checkpoint import CheckpointError
    untied, opt3 = init_model(build_model(CFG, "cpu"), "cpu", 0), None
    with pytest.raises(CheckpointError, match=r"model\.tie_embeddings: checkpoint True, config False"):
        CheckpointManager(tmp_path, CheckpointConfig(), model_cfg=CFG).load(untied, opt3)
