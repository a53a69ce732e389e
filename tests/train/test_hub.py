"""Hub ids (`org/name[@revision]`) for model.init_from, data.tokenizer and the tools' --model:
resolved in huggingface_hub's cache, offline when HF_HUB_OFFLINE=1, one clear line otherwise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train._hub_cache import seed_hub_cache
from train.config import ConfigError
from train.hub import parse_hub_id, resolve_model

pytest.importorskip("huggingface_hub")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec,expected", [
    ("HuggingFaceTB/SmolLM2-135M", ("HuggingFaceTB/SmolLM2-135M", None)),
    ("meta-llama/Llama-3.2-1B@main", ("meta-llama/Llama-3.2-1B", "main")),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("/models/llama", None),             # absolute path
    ("./org/name", None),                # explicitly relative
    ("~/org/name", None),
    ("models/llama/hf", None),           # two slashes: a path
    ("llama", None),                     # no namespace: a path
])
def test_what_is_a_hub_id(spec, expected):
    assert parse_hub_id(spec) == expected


def test_an_existing_local_folder_wins_over_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("org/name") is None
    assert resolve_model("org/name", "model.init_from") == "org/name"


def test_a_missing_local_path_says_it_does_not_exist():
    with pytest.raises(ConfigError, match=r"^model\.init_from=/nonexistent does not exist"):
        resolve_model("/nonexistent", "model.init_from")


def _resolve(spec: str, setting: str, hf_home: Path) -> subprocess.CompletedProcess:
    """resolve_model in a fresh process: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import."""
    code = ("import sys; from train.config import ConfigError; from train.hub import resolve_model\n"
            "try: print(resolve_model(sys.argv[1], sys.argv[2]))\n"
            "except ConfigError as e: print(e, file=sys.stderr); sys.exit(2)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code, spec, setting], env=env, capture_output=True,
                          text=True, timeout=60)


def test_offline_cache_resolves_revisions_and_a_missing_id_is_one_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    hf_home = tmp_path / "hf_home"
    main = seed_hub_cache(hf_home, "someorg/tiny-llama", model)
    v1 = seed_hub_cache(hf_home, "someorg/tiny-llama", model, revision="v1")
    found = _resolve("someorg/tiny-llama", "model.init_from", hf_home)
    assert found.returncode == 0 and Path(found.stdout.strip()) == main, found.stderr
    assert (Path(found.stdout.strip()) / "config.json").is_file()
    found = _resolve("someorg/tiny-llama@v1", "model.init_from", hf_home)
    assert Path(found.stdout.strip()) == v1 != main, found.stderr
    missing = _resolve("someorg/not-cached", "data.tokenizer", hf_home)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1, missing.stderr  # one line, no traceback
    assert missing.stderr.startswith("data.tokenizer=someorg/not-cached: ")
    assert "HF_HUB_OFFLINE=1" in missing.stderr and str(hf_home / "hub") in missing.stderr
