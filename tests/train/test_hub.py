"""Hub ids (`org/name[@revision]`) for model.init_from, data.tokenizer and the tools' --model:
resolved in huggingface_hub's cache, offline when HF_HUB_OFFLINE=1, one clear line otherwise. A
training job by Hub id asks the Hub once per node, names its run by the id as typed (so it resumes
across caches and Hub commits), and fails on every rank with the same line when the id cannot be
had."""
from __future__ import annotations

import os
import re
import shutil
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


# ---------------------------------------------------------------------- a training job by Hub id

HUB_ID = "HuggingFaceTB/SmolLM2-135M"  # the recipe's own model.init_from, as a user leaves it
# experiment=continual_smollm2_135m shrunk in size and steps: a tiny Llama in SmolLM2's place (the
# seeded cache's snapshot), 32-token windows of the embedded corpus, no periodic validation.
RECIPE = ["experiment=continual_smollm2_135m", "data=stdlib", "data.max_chars=1000000", "data.seq_len=32",
          "data.batch_size=2", "parallel=default", "optim.warmup_steps=1", "eval.every=0",
          "eval.batches=1", "logging.every=1", "logging.tensorboard=false"]


class _CountingHub:
    """A stand-in for the Hub's HTTP API (HF_ENDPOINT) that counts the requests for each
    repository's revision and answers 500: huggingface_hub then uses its cache, as when the Hub
    is down. One request is one download attempt."""

    def __init__(self):
        import http.server
        import threading
        self.paths: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.paths.append(self.path)
                self.send_response(500)
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def attempts(self, repo: str) -> int:
        return sum(p.startswith(f"/api/models/{repo}/revision/") for p in self.paths)

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny Llama exported as a Hugging Face folder with its sentencepiece tokenizer."""
    from tests.train._models import exported_random_model, sentencepiece_model
    from train.config import ModelConfig
    from train.data.sources import open_corpus
    folder = tmp_path_factory.mktemp("tiny_llama")
    text = "".join(open_corpus("stdlib").documents(300_000))
    tok = sentencepiece_model(folder, text, vocab_size=512)
    cfg = ModelConfig(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                      multiple_of=16, max_seq_len=64, tie_embeddings=True)
    return exported_random_model(folder / "hf", cfg, text[:2000], tokenizer=tok)


def _launch(hf_home: Path, cache: Path, *extra: str, hub: _CountingHub | None = None, restarts: int = 0):
    """`NPROC=2 bash launch/single_node.sh RECIPE...` (in the repository, as a user runs it)."""
    from tests._cluster import env
    from tests._launch import ROOT as REPO, start, wait_all
    e = env(NPROC="2", MAX_RESTARTS=str(restarts), HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        e.pop(var, None)
    if hub is not None:
        e["HF_ENDPOINT"] = hub.url
    else:
        e["HF_HUB_OFFLINE"] = "1"
    cmd = ["bash", str(REPO / "launch" / "single_node.sh"), *RECIPE, f"data.cache_dir={cache}", *extra]
    (done,) = wait_all([start(cmd, cwd=REPO, env=e)], timeout_s=300)
    return done


def test_a_run_by_hub_id_resumes_across_caches_and_hub_commits(tiny_llama, tmp_path):
    """The SmolLM2 recipe by Hub id, 2 ranks through the launch script: started with one
    HF_HOME, rerun (train.steps raised) with another HF_HOME holding a copy of the snapshot, and
    again after a second snapshot of the id with another commit appeared: one run directory, each
    rerun resumes it; each launch asks the Hub once (one node), and the commit each start
    resolved is recorded. With an empty cache offline, every rank fails with the same one line."""
    from tests._cluster import complete_steps, default_run_dir, read_losses
    from tests._launch import ROOT as REPO
    cache = tmp_path / "data"
    run_dir = default_run_dir(REPO, [*RECIPE, f"data.cache_dir={cache}", "train.steps=2"])
    assert run_dir == default_run_dir(REPO, [*RECIPE, f"data.cache_dir={cache}", "train.steps=4"])
    shutil.rmtree(run_dir, ignore_errors=True)
    first_home, second_home = tmp_path / "hf_a", tmp_path / "hf_b"
    first = seed_hub_cache(first_home, HUB_ID, tiny_llama)
    hub = _CountingHub()
    try:
        done = _launch(first_home, cache, "train.steps=2", hub=hub).check()
        assert "resumed from step" not in done.output and complete_steps(run_dir) == [2], done.output[-3000:]
        assert hub.attempts(HUB_ID) == 1, hub.paths  # local rank 0 only
        assert _resolved(run_dir) == first.name

        shutil.copytree(first_home, second_home, symlinks=True)  # the same snapshot, elsewhere
        done = _launch(second_home, cache, "train.steps=3", hub=hub).check()
        assert "resumed from step 2 (" in done.output, done.output[-3000:]
        assert "train.steps changed from 2 to 3" in done.output
        assert hub.attempts(HUB_ID) == 2, hub.paths

        newer = seed_hub_cache(second_home, HUB_ID, tiny_llama, commit="f" * 40)  # the Hub moved on
        assert newer != first
        done = _launch(second_home, cache, "train.steps=4", hub=hub).check()
        assert "resumed from step 3 (" in done.output, done.output[-3000:]
        assert hub.attempts(HUB_ID) == 3, hub.paths
        assert _resolved(run_dir) == "f" * 40
        assert sorted(read_losses(run_dir)) == [1, 2, 3, 4]
    finally:
        hub.close()
        shutil.rmtree(run_dir, ignore_errors=True)

    failed = _launch(tmp_path / "empty_hf_home", cache, "train.steps=2")
    assert failed.returncode != 0
    errors = {}
    for line in failed.output.splitlines():
        if found := re.search(r"\[rank(\d)\] ERROR train: (.*)", line):
            errors.setdefault(found[1], []).append(found[2])
    assert sorted(errors) == ["0", "1"] and all(len(e) == 1 for e in errors.values()), failed.output[-3000:]
    assert errors["0"] == errors["1"], errors
    assert f"model.init_from={HUB_ID}: " in errors["0"][0] and "HF_HUB_OFFLINE=1" in errors["0"][0]
    assert not re.search(r"\[rank\d\]: Traceback", failed.output), failed.output[-3000:]
    assert not run_dir.exists()


def _resolved(run_dir: Path) -> str:
    """The snapshot commit the run's last start resolved model.init_from to (identity.json)."""
    import json
    return json.loads((run_dir / "identity.json").read_text())["resolved"]["model.init_from"]["commit"]
