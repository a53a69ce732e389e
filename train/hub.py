"""Hugging Face Hub ids wherever a model or tokenizer folder is taken: `org/name[@revision]`.

    resolve_model("HuggingFaceTB/SmolLM2-135M", "model.init_from")  # -> the snapshot folder
    resolve_model("/models/llama", "model.init_from")                 # -> unchanged (it exists)

Entry points call this once, before anything else reads the path (`python -m train`, the
prepare CLI, `train.decode --model`, `train.eval_exits --model`), so the rest of the code only
ever sees local folders. A Hub id is fetched with `huggingface_hub.snapshot_download` into its
usual cache (`HF_HOME`, `HF_HUB_CACHE`; only config, tokenizer and safetensors files), and
`HF_HUB_OFFLINE=1` reads the cache only. Anything that cannot be had is a `ConfigError` of one
line naming the setting: a local path that does not exist, an id not on the Hub, or an id that is
not cached while offline.

A distributed training job (`resolve_hub_ids` with a process group up) asks the Hub once per node:
each node's local rank 0 fetches into that node's cache while the node's other ranks wait, then
they read the same snapshot from the cache without the network. Whatever failed on any rank is
then raised on every rank, as the same line (the fetching rank's error first), so no rank goes on
alone into a collective its peers never reach. The wait is a barrier of its own with a long
timeout (HUB_WAIT_S): a large model's download outlasts the job's collective timeout.

The run is named by the Hub id as typed, not by the folder it resolves to (train/run_identity.py).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
from pathlib import Path

from train.config import Config, ConfigError

log = logging.getLogger(__name__)

# What a model folder needs (train/hf.py reads config.json and safetensors; the tokenizer files
# are read by train/data/tokenizer.py and transformers); weights in other formats are not fetched.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]

# org/name with the Hub's characters, optionally @revision (a branch, tag or commit).
_HUB_ID = re.compile(r"(?P<repo>[\w\-.]{1,96}/[\w\-.]{1,96})(@(?P<revision>[\w\-./]+))?")

# How long a node's other ranks wait for its local rank 0's download (a 70B model over a slow link).
HUB_WAIT_S = 6 * 3600


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `spec` is written as a Hub id, else None. A path that exists
    locally is never a Hub id, so a local folder named like one wins."""
    m = _HUB_ID.fullmatch(spec)
    if m is None or spec.startswith((".", "~")) or Path(spec).expanduser().exists():
        return None
    return m["repo"], m["revision"]


def resolve_model(spec: str, setting: str, files: list[str] = MODEL_FILES, *, cache_only: bool = False) -> str:
    """The local folder `spec` stands for: itself if it exists, else the Hub snapshot of the Hub
    id it is (with `cache_only`, from the cache without asking the Hub). `setting` names the
    option in errors (`model.init_from`, `--model`)."""
    hub = parse_hub_id(spec)
    if hub is None:
        if not Path(spec).expanduser().exists():
            raise ConfigError(f"{setting}={spec} does not exist (a local folder, or a Hugging Face "
                              f"Hub id written org/name[@revision])")
        return spec
    return _snapshot(*hub, spec=spec, setting=setting, files=files, cache_only=cache_only)


def hub_folder(spec: str, option: str) -> Path | None:
    """For command-line tools: the snapshot folder if `spec` is a Hub id, None if it is not (a
    local path, checked by the caller); a Hub id that cannot be had exits with the one line."""
    hub = parse_hub_id(spec)
    if hub is None:
        return None
    try:
        return Path(_snapshot(*hub, spec=spec, setting=option, files=MODEL_FILES))
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def _snapshot(repo: str, revision: str | None, *, spec: str, setting: str, files: list[str],
              cache_only: bool = False) -> str:
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise ConfigError(f"{setting}={spec} is a Hugging Face Hub id, which needs huggingface_hub: "
                          f"pip install 'layerskip-titan[hf]'") from None
    where = f"no local folder {spec}, and"
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=files, local_files_only=cache_only)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ConfigError(f"{setting}={spec}: {where} the Hugging Face Hub has no accessible repository "
                          f"{repo} ({type(e).__name__}; a gated or private one needs `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{setting}={spec}: the Hugging Face Hub repository {repo} has no revision "
                          f"{revision}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        if cache_only and not constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"{setting}={spec}: {where} it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                f"after this node's local rank 0 fetched it: every rank of a node must see the same "
                f"cache (HF_HOME, HF_HUB_CACHE)") from None
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"{setting}={spec}: {where} it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                f"while HF_HUB_OFFLINE=1 forbids downloading it; fetch it where the Hub can be reached "
                f"(`hf download {repo}` with the same HF_HOME) or give a local folder") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{setting}={spec}: {where} it could not be fetched from the Hugging Face Hub "
                          f"nor found in its cache ({constants.HF_HUB_CACHE}): {reason}") from None
    log.info("%s=%s: Hugging Face snapshot %s", setting, spec, folder)
    return folder


def resolve_hub_ids(cfg: Config) -> Config:
    """`cfg` with model.init_from and data.tokenizer turned into local paths (see module doc).
    Every rank calls it; with a process group of several ranks, once per node (see module doc)."""
    settings = [("model.init_from", cfg.model.init_from, MODEL_FILES),
                ("data.tokenizer", cfg.data.tokenizer, TOKENIZER_FILES)]
    wanted = [(key, spec, files) for key, spec, files in settings if spec is not None]
    group = _node_wait_group() if any(parse_hub_id(spec) for _, spec, _ in wanted) else None
    fetches = group is None or int(os.environ.get("LOCAL_RANK", "0")) == 0
    found: dict[str, str] = {}
    error = _resolve_all(wanted, found, cache_only=False) if fetches else None
    if group is not None:
        import torch.distributed as dist
        try:
            dist.barrier(group=group)  # this node's local rank 0 has fetched (or failed)
            if not fetches:
                error = _resolve_all(wanted, found, cache_only=True)
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, (not fetches, error), group=group)
        finally:
            dist.destroy_process_group(group)
        error = next((e for _, e in sorted(errors, key=lambda x: x[0]) if e), None)
    if error:
        raise ConfigError(error)
    model, data = cfg.model, cfg.data
    if "model.init_from" in found:
        model = dataclasses.replace(model, init_from=found["model.init_from"])
    if "data.tokenizer" in found:
        data = dataclasses.replace(data, tokenizer=found["data.tokenizer"])
    return dataclasses.replace(cfg, model=model, data=data)


def _resolve_all(wanted: list[tuple[str, str, list[str]]], found: dict[str, str], *, cache_only: bool) -> str | None:
    """Resolve each (setting, spec, files) into `found`; the first error's line, else None."""
    try:
        for key, spec, files in wanted:
            found[key] = resolve_model(spec, key, files, cache_only=cache_only)
    except ConfigError as e:
        return str(e)
    return None


def _node_wait_group():
    """A gloo group over every rank with HUB_WAIT_S as its timeout, when a process group of
    several ranks is up (torchrun); else None (one process: nothing to coordinate)."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=HUB_WAIT_S))
