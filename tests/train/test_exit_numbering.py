"""One numbering of exits: the same number E (blocks run, 1..L; E = L the full model) selects the
same exit in every place a user types or reads one, and it is Hugging Face's:

- `hidden_states[E]` of transformers' LlamaForCausalLM (through its norm + head) and
  `generate(..., assistant_early_exit=E)`, whose drafts run E decoder layers;
- `eval.at_exits` and validation's metric name `val/loss/exit_EE`;
- `layerskip.exit.exits` (the training exit loss);
- `train.decode`'s perplexity row "exit": E and `train.eval_exits --exits E` (the cut model).

One process, a tiny random model (fp32): equal losses / logits for the same E, and different
ones for the neighbouring exits, so an off-by-one anywhere fails."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.config import ModelConfig, load_config, to_dict
from tests.train._models import exported_random_model, one_thread  # noqa: F401

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
CFG = ModelConfig(name="test", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256,
                  multiple_of=32, max_seq_len=64)
L, SEQ, WINDOWS = CFG.n_layers, 12, 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(our model, transformers' LlamaForCausalLM) with the same random weights: the export."""
    from transformers import LlamaForCausalLM

    from train.hf import load_hf_model
    hf_dir = exported_random_model(tmp_path_factory.mktemp("numbering") / "hf", CFG, "unused")
    theirs = LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    ours, _ = load_hf_model(hf_dir)
    return ours.eval(), theirs


def _config(**sections):
    """The typed config a user's `eval.at_exits=...` / `layerskip.exit.exits=...` gives."""
    return load_config({"model": to_dict(CFG), "data": {"seq_len": SEQ}, **sections})


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).item()


@torch.no_grad()
def test_the_same_exit_number_is_the_same_exit_everywhere(models):
    from train.decode import exit_perplexities
    from train.eval_exits import truncated
    from train.layerskip.curriculum import ExitCurriculum
    from train.layerskip.exit_loss import make_exit_loss
    from train.validation import evaluate
    ours, theirs = models
    ids = torch.randint(0, CFG.vocab_size, (WINDOWS * SEQ + 1,), generator=torch.Generator().manual_seed(0))
    windows = ids[torch.arange(WINDOWS)[:, None] * SEQ + torch.arange(SEQ + 1)]
    inputs, labels = windows[:, :-1], windows[:, 1:]  # train.decode's windows, as one batch

    # Hugging Face: hidden_states[E] is the output of E decoder layers (the last one already normed).
    out = theirs(inputs, output_hidden_states=True)
    hf = {E: _ce(theirs.lm_head(theirs.model.norm(out.hidden_states[E])), labels) for E in range(1, L)}
    hf[L] = _ce(out.logits, labels)
    assert len(set(round(v, 4) for v in hf.values())) == L  # the exits differ: an off-by-one shows

    # Validation, with the exits a user types as eval.at_exits, named val/loss/exit_EE.
    cfg = _config(eval={"at_exits": [1, 3]})
    vals = evaluate(ours, [(inputs, labels)], cfg.eval.exit_list(L), chunk_tokens=7, tp=1, dp_group=None)
    assert sorted(k for k in vals if k.startswith("val/loss/exit_")) == [
        "val/loss/exit_01", "val/loss/exit_03", f"val/loss/exit_{L:02d}"]
    for E in (1, 3, L):
        assert vals[f"val/loss/exit_{E:02d}"] == pytest.approx(hf[E], rel=1e-5), E
    assert vals["val/loss/final"] == pytest.approx(hf[L], rel=1e-5)

    # The training exit loss, with layerskip.exit.exits=[E] (every step: curriculum fixed).
    for E in (1, 2, 3):
        cur = ExitCurriculum(_config(layerskip={"exit": {"exits": [E], "curriculum": "fixed"}}).layerskip.exit,
                             L, total_steps=10)
        weights = cur.weights(0)
        got = ours(inputs, capture=cur.capture(0), loss_fn=make_exit_loss(labels, weights, chunk_tokens=7))
        # per_layer is keyed like the model's capture: block E - 1, logged as loss/exit_EE (the
        # trainer's names are checked in tests/test_layouts.py and tests/train/test_trainer.py).
        assert sorted(got.per_layer) == [E - 1, L - 1]
        assert got.per_layer[E - 1].item() == pytest.approx(hf[E], rel=1e-5), E
        assert got.per_layer[L - 1].item() == pytest.approx(hf[L], rel=1e-5)

    # train.decode's perplexity of exit E on the same windows.
    rows = {r["exit"]: r["loss"] for r in exit_perplexities(ours, ids.tolist(), SEQ, WINDOWS * SEQ)["layers"]}
    assert rows == pytest.approx(hf, rel=1e-5)

    # train.eval_exits --exits E: transformers' model cut to its first E layers.
    for E in range(1, L + 1):
        with truncated(theirs, E):
            assert _ce(theirs(inputs).logits, labels) == pytest.approx(hf[E], rel=1e-5), E


@torch.no_grad()
def test_assistant_early_exit_drafts_with_our_exit(models):
    """generate(assistant_early_exit=E): its draft runs E decoder layers and its draft logits are
    our exit E's (and not the neighbouring exits')."""
    ours, theirs = models
    prompt = torch.randint(0, CFG.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    _, hidden = ours(prompt, capture=range(L))
    ran, drafts = [0], []

    def count_layer(*_) -> None:
        ran[0] += 1

    def note_head(_module, _inputs, logits) -> None:
        """Every forward ends in the head: how many decoder layers ran, its last position's logits."""
        drafts.append((ran[0], logits[0, -1].clone()))
        ran[0] = 0

    hooks = [layer.register_forward_hook(count_layer) for layer in theirs.model.layers]
    hooks.append(theirs.lm_head.register_forward_hook(note_head))
    try:
        for E in (1, 2, 3):
            drafts.clear()
            ran[0] = 0
            theirs.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_early_exit=E,
                            num_assistant_tokens=2, max_new_tokens=3, do_sample=False, pad_token_id=0)
            first_depth, first_logits = drafts[0]  # the first draft: E layers over the prompt
            assert first_depth == E
            want = ours.unembed(hidden[E - 1])[0, -1]
            torch.testing.assert_close(first_logits, want, atol=1e-4, rtol=1e-4)
            for other in {E - 1, E + 1} & set(range(1, L + 1)):
                assert not torch.allclose(first_logits, ours.unembed(hidden[other - 1])[0, -1], atol=1e-3)
    finally:
        for h in hooks:
            h.remove()
