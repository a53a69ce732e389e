"""Every recipe composes and validates; command-line overrides reach the typed config; bad values
fail early naming the key."""
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from train.config import ConfigError, load_config, register_schemas

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
register_schemas()


def _compose(overrides=()):
    with initialize_config_dir(version_base="1.3", config_dir=str(RECIPES)):
        return load_config(compose("train", overrides=list(overrides)))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (RECIPES / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    extra = [] if experiment == "quickstart" else ["data.source=/some/corpus"]
    cfg = _compose([f"experiment={experiment}", *extra])
    assert cfg.experiment == experiment
    assert cfg.data.seq_len <= cfg.model.max_seq_len


@pytest.mark.parametrize("group", ["model", "data", "optim", "layerskip", "parallel", "checkpoint", "logging"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (RECIPES / group).glob("*.yaml")):
        overrides = [f"{group}={option}", "data.source=/corpus", "data.seq_len=256"]
        if (group, option) == ("model", "hf"):  # its shape is read from the folder at start-up
            overrides.append("model.init_from=/some/hf_dir")
        cfg = _compose(overrides)
        if group == "model":
            assert cfg.model.name == option


def test_paper_presets_have_the_papers_shapes():
    from train.model import build_model
    expected = {"llama2_7b": 6.74e9, "llama2_13b": 13.0e9, "llama3_8b": 8.03e9, "llama3_2_1b": 1.24e9,
                "llama_1_5b": 1.36e9}  # paper calls it 1.5B; this shape with a 32k vocabulary is 1.36B
    # (Llama 3.2 1B: 1.24B with its tied embeddings, as published)
    for name, n in expected.items():
        cfg = _compose([f"model={name}"])
        model = build_model(cfg.model)  # meta device: no memory
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - n) / n < 0.08, (name, count)


def test_cli_overrides_reach_typed_config():
    cfg = _compose(["layerskip.dropout.p_max=0.2", "layerskip.exit.curriculum=rotational",
                    "layerskip.exit.exits=4::4", "train.steps=7", "checkpoint.async=true", "model=llama2_7b"])
    assert cfg.layerskip.dropout.p_max == 0.2 and cfg.train.steps == 7
    assert cfg.checkpoint.async_save is True
    assert cfg.model.name == "llama2_7b"  # the command line beats the experiment's choice
    assert cfg.layerskip.exit.exit_list(cfg.model.n_layers) == [4, 8, 12, 16, 20, 24, 28]  # E = 32: always


@pytest.mark.parametrize("override,key", [
    ("optim.lr=-1", "optim.lr"),
    ("data.seq_len=5000", "data.seq_len"),
    ("data.batch_size=0", "data.batch_size"),
    ("layerskip.dropout.p_max=1.5", "layerskip.dropout.p_max"),
    ("layerskip.exit.e_scale=2", "layerskip.exit.e_scale"),
    ("layerskip.exit.period=0", "layerskip.exit.period"),
    ("layerskip.exit.exits=[99]", "layerskip.exit.exits"),
    ("layerskip.exit.exits=[0]", "layerskip.exit.exits"),  # exits count blocks run: 1..L
    ("layerskip.dropout.depth=cubic", "layerskip.dropout.depth"),
    ("parallel.ac=some", "parallel.ac"),
    ("train.steps=abc", "train.steps"),
    ("model.n_heads=5", "model.n_heads"),
    ("checkpoint.resume=yesterday", "checkpoint.resume"),
    ("train.seed=-1", "train.seed"),  # would crash at the first batch (numpy's SeedSequence)
])
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _compose([override])


@pytest.mark.parametrize("override,new,shifted", [
    ("layerskip.exit.layers=0::4", "layerskip.exit.exits", "'1::4'"),
    ("layerskip.exit.layers=[3,-1]", "layerskip.exit.exits", "[4,-1]"),
    ("eval.exits=[3]", "eval.at_exits", "[4]"),
    ("eval.exits=2:6", "eval.at_exits", "'3:7'"),
])
def test_settings_that_counted_block_indices_are_refused(override, new, shifted):
    """Exits are counted in blocks run (E = 1..L): the old keys, whose digits named the exit one
    block earlier, are refused with the new key and the +1 shift, never reinterpreted."""
    old = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{old} was renamed {new}.*E = block index \+ 1.*"
                                          rf"is {new}={re.escape(shifted)}"):
        _compose([override])
    from train.config import Config, from_dict
    section, *path = old.split(".")
    data = {path[-1]: override.split("=")[1]}
    for part in reversed([section, *path[:-1]]):
        data = {part: data}
    with pytest.raises(ConfigError, match=rf"{old} was renamed {new}"):  # in a YAML file as well
        from_dict(Config, data)


def test_unknown_key_is_rejected_with_suggestion():
    from train.config import Config, from_dict
    with pytest.raises(ConfigError, match=r"optim\.lrr.*optim\.lr"):
        from_dict(Config, {"optim": {"lrr": 1.0}})


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (RECIPES / "experiment").glob("*.yaml")))
def test_layerskip_none_is_plain_pretraining_under_every_experiment(experiment):
    """The paper's baseline: `layerskip=none` replaces every LayerSkip setting an experiment makes
    (experiments choose them as a group option, not as `layerskip.*` keys after the group)."""
    base = [f"experiment={experiment}", "data.source=/some/corpus"]
    with_layerskip, baseline = _compose(base), _compose([*base, "layerskip=none"])
    n_layers = with_layerskip.model.n_layers or 8  # model=hf: the depth is read at start-up
    assert with_layerskip.layerskip.dropout.enabled and with_layerskip.layerskip.exit.exit_list(n_layers)
    assert not baseline.layerskip.dropout.enabled
    assert baseline.layerskip.exit.exit_list(n_layers) == []
    assert (baseline.model, baseline.optim, baseline.train) == (with_layerskip.model, with_layerskip.optim,
                                                                with_layerskip.train)


def test_quickstart_with_layerskip_none_logs_no_dropout_and_no_exit_loss(tmp_path):
    """What a new user types, `python -m train layerskip=none` (shrunk to a few steps of a small
    model on a small corpus): no layer is dropped and only the final layer is in the loss."""
    import json
    import sysconfig

    from train.trainer import run
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for src in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        (corpus / f"{src.stem}.txt").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = _compose(["layerskip=none", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                    f"run_dir={tmp_path / 'run'}", "model.dim=32", "model.n_layers=3", "model.n_heads=2",
                    "model.n_kv_heads=1", "model.vocab_size=512", "model.multiple_of=16",
                    "model.max_seq_len=32", "data.seq_len=16", "data.batch_size=4", "data.val_fraction=0.2",
                    "train.steps=4",
                    "logging.every=2", "logging.tensorboard=false", "eval.every=0", "eval.batches=1",
                    "checkpoint.interval=0", "checkpoint.save_final=false"])
    assert cfg.experiment == "quickstart"
    run_dir = run(cfg)
    train = [r for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in (r := json.loads(line))]
    assert [r["step"] for r in train] == [2, 4]
    for record in train:
        assert not [k for k in record if k.startswith("layerskip/drop_fraction/")], record
        assert [k for k in record if k.startswith("loss/exit_")] == ["loss/exit_03"]  # E = L = 3 only
        assert record["layerskip/exit_weight/exit_03"] == 1.0
        assert record["layerskip/saved_block_compute"] == 0.0


def test_continual_smollm2_is_the_papers_llama3_recipe_on_a_hub_id():
    """`experiment=continual_smollm2_135m`: SmolLM2-135M by Hub id, the shape read from it
    (model=hf), the paper's Llama 3 continual settings; its CPU overrides (recipe comment,
    bench/smollm2_report.sh) keep them and fit the context."""
    cfg = _compose(["experiment=continual_smollm2_135m", "data.source=/some/corpus"])
    assert cfg.model.name == "hf" and cfg.model.init_from == "HuggingFaceTB/SmolLM2-135M"
    assert cfg.model.unset_shape_keys  # read from the checkpoint at start-up
    ls = cfg.layerskip
    assert (ls.dropout.p_max, ls.exit.e_scale, ls.exit.curriculum, ls.exit.period) == (0.1, 0.1, "rotational", 8)
    assert ls.exit.exit_list(30) == list(range(1, 30)) and cfg.parallel.compile
    cpu = _compose(["experiment=continual_smollm2_135m", "model.init_from=/models/smollm2", "data=stdlib",
                    "data.seq_len=256", "data.batch_size=2", "parallel=default", "train.steps=60"])
    assert cpu.layerskip == ls and not cpu.parallel.compile and cpu.data.source == "stdlib"
    assert cpu.data.seq_len <= cfg.model.max_seq_len


def test_a_run_written_with_block_indices_is_read_as_exits(tmp_path):
    """A run's config.yaml from before the renaming (its key says block indices) exports as the
    same exits, E = index + 1; the same keys typed by a user are refused."""
    from omegaconf import OmegaConf

    from train.config import to_dict
    from train.export import load_run_config
    saved = to_dict(_compose(["model=tiny"]))
    saved["layerskip"]["exit"].pop("exits")
    saved["layerskip"]["exit"]["layers"] = "0::4"
    saved["eval"].pop("at_exits")
    saved["eval"]["exits"] = [3, -1]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    cfg = load_run_config(tmp_path)
    assert cfg.layerskip.exit.exit_list(8) == [1, 5] and cfg.eval.exit_list(8) == [4, 8]
    with pytest.raises(ConfigError, match=r"layerskip\.exit\.layers was renamed"):
        load_config(saved)
