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
"""
from __future__ import annotations

import dataclasses
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


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `spec` is written as a Hub id, else None. A path that exists
    locally is never a Hub id, so a local folder named like one wins."""
    m = _HUB_ID.fullmatch(spec)
    if m is None or spec.startswith((".", "~")) or Path(spec).expanduser().exists():
        return None
    return m["repo"], m["revision"]


def resolve_model(spec: str, setting: str, files: list[str] = MODEL_FILES) -> str:
    """The local folder `spec` stands for: itself if it exists, else the Hub snapshot of the Hub
    id it is. `setting` names the option in errors (`model.init_from`, `--model`)."""
    hub = parse_hub_id(spec)
    if hub is None:
        if not Path(spec).expanduser().exists():
            raise ConfigError(f"{setting}={spec} does not exist (a local folder, or a Hugging Face "
                              f"Hub id written org/name[@revision])")
        return spec
    return _snapshot(*hub, spec=spec, setting=setting, files=files)


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


def _snapshot(repo: str, revision: str | None, *, spec: str, setting: str, files: list[str]) -> str:
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise ConfigError(f"{setting}={spec} is a Hugging Face Hub id, which needs huggingface_hub: "
                          f"pip install 'layerskip-titan[hf]'") from None
    where = f"no local folder {spec}, and"
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=files)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ConfigError(f"{setting}={spec}: {where} the Hugging Face Hub has no accessible repository "
                          f"{repo} ({type(e).__name__}; a gated or private one needs `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{setting}={spec}: the Hugging Face Hub repository {repo} has no revision "
                          f"{revision}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
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
    """`cfg` with model.init_from and data.tokenizer turned into local paths (see module doc). Every
    rank calls it; huggingface_hub's file locks let concurrent downloads share one cache."""
    model, data = cfg.model, cfg.data
    if model.init_from is not None:
        model = dataclasses.replace(model, init_from=resolve_model(model.init_from, "model.init_from"))
    if data.tokenizer is not None:
        data = dataclasses.replace(data, tokenizer=resolve_model(data.tokenizer, "data.tokenizer",
                                                                 TOKENIZER_FILES))
    return dataclasses.replace(cfg, model=model, data=data)
