"""Export a run's checkpoint as a Hugging Face Llama folder.

    python -m train.export --run RUN_DIR --out HF_DIR [--step N] [--dtype bfloat16] [--draft-exit E]
    python -m train.export --hf HF_DIR --out DRAFT_DIR --draft-exit E

Reads RUN_DIR/config.yaml (the resolved config the trainer wrote), verifies the chosen checkpoint
against its manifest (the newest intact one, or exactly step N), loads only the model part of it
with torch.distributed.checkpoint in this single CPU process -- whatever data-/tensor-parallel
layout saved it -- and writes the folder with `train.hf.export_hf`, including the tokenizer the
run trained with (RUN_DIR/tokenizer.model, or RUN_DIR/tokenizer.json with its config files).

--draft-exit E writes the draft model of self-speculative decoding instead: the first E blocks, the
embedding, the shared final norm and the head, as a plain Llama of E layers whose logits are the
full model's exit E. Servers that take a separate draft model load it as they load any Llama
(transformers: `generate(..., assistant_model=...)`; vLLM: its draft-model speculative decoding).
With --hf the draft is cut from an existing Hugging Face folder (kept in its dtype).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from train.checkpoint import check_compatible, read_meta, select_checkpoint, verify_files
from train.config import Config, load_config
from train.data.tokenizer import find_tokenizer_file
from train.model import build_model

log = logging.getLogger("train.export")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_run_config(run_dir: Path) -> Config:
    from omegaconf import OmegaConf
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run must be a run directory written by "
                                f"`python -m train` (it holds config.yaml and checkpoints/)")
    return load_config(OmegaConf.load(path), saved=True)


def load_model_weights(checkpoint: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """The full model state dict (our names) of one checkpoint folder, on CPU, in the dtype it
    was saved in. The optimizer state in the folder is not read."""
    check_compatible(read_meta(checkpoint), cfg.model, checkpoint)
    # The keys and shapes come from the model; every value is overwritten by the load, so the
    # weights need no initialisation (which would cost minutes for a large model on CPU).
    model = build_model(cfg.model, "meta").to_empty(device="cpu")
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    return state["model"]


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None,
               dtype: torch.dtype = torch.bfloat16, draft_exit: int | None = None) -> Path:
    """Export checkpoint `step` of `run_dir` (default: the newest intact one) to `out_dir`; with
    `draft_exit` E, only its first E blocks (the draft model, `train.hf.draft_state_dict`)."""
    from train.hf import draft_state_dict, export_hf
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    root = run_dir / "checkpoints"
    checkpoint = select_checkpoint(root, "latest" if step is None else str(step), verify_files)
    if checkpoint is None:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    state_dict = load_model_weights(checkpoint, cfg)
    model_cfg = cfg.model
    if draft_exit is not None:
        state_dict, model_cfg = draft_state_dict(state_dict, model_cfg, draft_exit)
    tokenizer_path = find_tokenizer_file(run_dir)  # the run's tokenizer.model or tokenizer.json
    if tokenizer_path is None:
        log.warning("%s holds no tokenizer.model or tokenizer.json: exporting without a tokenizer", run_dir)
    heldout = run_dir / "heldout.txt"  # written by the trainer: decode's default evaluation text
    heldout_text = heldout.read_text(encoding="utf-8") if heldout.is_file() and draft_exit is None else None
    out = export_hf(state_dict, model_cfg, out_dir, tokenizer_path, dtype, heldout_text=heldout_text)
    log.info("exported %s to %s (%s)", checkpoint, out, str(dtype).removeprefix("torch."))
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export",
                                     description="Export a run's checkpoint as a Hugging Face Llama folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (holds config.yaml, checkpoints/)")
    source.add_argument("--hf", help="Hugging Face folder to cut a draft from (with --draft-exit)")
    parser.add_argument("--out", required=True, help="Hugging Face folder to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest intact)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--draft-exit", type=int, metavar="E",
                        help="write the draft model: the first E blocks + the shared norm and head")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.hf and args.draft_exit is None:
        parser.error("--hf needs --draft-exit E (a Hugging Face folder is already an export)")
    try:
        if args.hf:
            from train.hf import export_draft_from_hf
            export_draft_from_hf(args.hf, args.out, args.draft_exit)
        else:
            export_run(args.run, args.out, args.step, DTYPES[args.dtype], args.draft_exit)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # CheckpointError, ConfigError
        log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
