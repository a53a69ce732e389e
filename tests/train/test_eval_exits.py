"""python -m train.eval_exits: lm-evaluation-harness on the export cut at every exit E."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.word_order_task import write_task
from train.config import ModelConfig
from tests.train._models import exported_random_model, one_thread, sentencepiece_model  # noqa: F401

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=96)
TASK = "exit_probe"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama exported with its converted tokenizer, and a local task folder."""
    folder = tmp_path_factory.mktemp("eval_exits")
    text = Path(ROOT, "train/inference.py").read_text() + Path(ROOT, "train/model.py").read_text()
    hf = exported_random_model(folder / "hf", CFG, text, tokenizer=sentencepiece_model(folder, text))
    # A local task over local JSON, as a user would write one for an offline cluster (32 items).
    return hf, write_task(text, folder / "tasks", TASK, n_items=32, cache_dir=folder / "datasets_cache")


@torch.no_grad()
def test_truncated_hf_model_is_our_early_exit(exported):
    """The cut transformers model's logits are our exit E's: E blocks, then the shared norm + head."""
    from transformers import LlamaForCausalLM

    from train.eval_exits import truncated
    from train.hf import load_hf_model
    hf_dir, _ = exported
    theirs = LlamaForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    ours, _ = load_hf_model(hf_dir)
    tokens = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    _, hidden = ours(tokens, capture=range(CFG.n_layers))
    for E in (1, 3, 4):
        with truncated(theirs, E):
            got = theirs(tokens).logits
        torch.testing.assert_close(got, ours.unembed(hidden[E - 1]), atol=1e-4, rtol=1e-4)
    assert len(theirs.model.layers) == theirs.config.num_hidden_layers == CFG.n_layers  # restored


def test_eval_exits_cli_scores_every_exit_and_matches_lm_eval_at_full_depth(exported, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from train.eval_exits import main
    hf_dir, tasks = exported
    out_json, out_png = tmp_path / "exits.json", tmp_path / "exits.png"
    main(["--model", str(hf_dir), "--exits", "1,2,L", "--tasks", TASK, "--include-path", str(tasks),
          "--batch-size", "8", "--device", "cpu", "--json", str(out_json), "--plot", str(out_png)])
    report = json.loads(out_json.read_text())
    assert report["step"] is None and report["n_layers"] == CFG.n_layers and report["exits"] == [1, 2, 4]
    assert sorted(report["results"]) == ["1", "2", "4"]
    for scores in report["results"].values():
        assert set(scores) == {TASK} and 0 <= scores[TASK]["acc"] <= 1 and scores[TASK]["acc_stderr"] > 0
    # lm-eval's own run on the untruncated export, loaded by lm-eval itself from the folder.
    own = simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"},
                          tasks=[TASK], batch_size=8, task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          log_samples=False)["results"][TASK]
    full = report["results"]["4"][TASK]
    assert full["acc"] == own["acc,none"] and full["acc_stderr"] == own["acc_stderr,none"]
    from PIL import Image
    with Image.open(out_png) as im:
        assert im.format == "PNG" and len(im.convert("L").getcolors(1 << 16)) > 10

    with pytest.raises(SystemExit, match=r"--exits must be in 1\.\.4"):
        main(["--model", str(hf_dir), "--exits", "0,5", "--tasks", TASK, "--include-path", str(tasks)])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_run_directory_is_exported_at_its_checkpoint_step(tmp_path):
    """--model RUN_DIR: the newest complete checkpoint (or --step N) is exported to a temporary
    folder, and the report names its step."""
    from omegaconf import OmegaConf

    from train.checkpoint import CheckpointManager
    from train.config import CheckpointConfig, Config, DataConfig, to_dict
    from train.eval_exits import resolve_model
    from train.hf import load_hf_state_dict
    from tests.train._models import random_model
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(Config(model=CFG, data=DataConfig(seq_len=32))))))
    ckpt = CheckpointManager(run / "checkpoints", CheckpointConfig(keep=3), model_cfg=CFG)
    models = {step: random_model(CFG, seed=step) for step in (3, 7)}
    for step, model in models.items():
        ckpt.save(step, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    for asked, want in ((None, 7), (3, 3)):
        with resolve_model(str(run), asked) as (hf_dir, step):
            assert step == want
            got = load_hf_state_dict(hf_dir, CFG)
            assert all(torch.equal(got[k], v) for k, v in models[want].state_dict().items())
        assert not hf_dir.exists()  # the temporary export is gone
    with pytest.raises(SystemExit, match="--step 5"):
        with resolve_model(str(run), 5):
            pass
