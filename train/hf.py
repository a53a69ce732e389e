"""Hugging Face interchange: our Llama <-> a standard `LlamaForCausalLM` folder.

A folder holds config.json, model.safetensors (or shards + model.safetensors.index.json),
generation_config.json and the run's tokenizer in a form `transformers.AutoTokenizer` loads: a
sentencepiece tokenizer.model plus the tokenizer.json and tokenizer_config.json converted from it,
or a Hugging Face tokenizer.json (Llama 3) with its config files. `resolve_model_shape` gives
`model=hf` its shape from the folder's config.json. Names and the q/k row permutation (our
interleaved RoPE vs HF's rotate-half) are torchtitan's `Llama3StateDictAdapter`; the rest is here:
the config, sharded safetensors, atomic writes, and loading one tensor at a time into a possibly
sharded (DTensor) model, so an import never materialises the whole model on one rank.

safetensors and transformers are the optional `hf` extra and are imported only when needed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from train.config import Config, ConfigError, ModelConfig, RopeScalingConfig, ffn_hidden_dim
from train.data.tokenizer import Tokenizer, copy_tokenizer, load_tokenizer
from train.model import LayerSkipLlama, build_model, model_args

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 4 * 2**30  # HF's usual shard size; smaller files load with less peak memory
_INSTALL = "pip install layerskip-titan[hf]"


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for Hugging Face import/export: {_INSTALL}") from e


def _adapter(cfg: ModelConfig):
    from torchtitan.models.llama3 import Llama3StateDictAdapter
    return Llama3StateDictAdapter(model_args(cfg), None)


# --------------------------------------------------------------------------- config

TokenizerArg = Tokenizer | str | os.PathLike | None  # a tokenizer, its file or folder, or none


def _open_tokenizer(tokenizer: TokenizerArg) -> Tokenizer | None:
    if tokenizer is None or isinstance(tokenizer, Tokenizer):
        return tokenizer
    return load_tokenizer(tokenizer)


def _rope_scaling_dict(rs: RopeScalingConfig | None) -> dict | None:
    if rs is None:
        return None
    return {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_seq_len}


def hf_config_dict(model_cfg: ModelConfig, tokenizer: TokenizerArg = None,
                   dtype: torch.dtype = torch.float32) -> dict:
    """config.json of a `LlamaForCausalLM` with our shape. `tokenizer` (for the bos/eos ids): a
    tokenizer, its file or folder, or None. Legacy `rope_theta`/`rope_scaling` keys are written:
    transformers 4 reads them and 5 converts them. `tie_word_embeddings` is the model's: a tied model has one matrix and exports it once, as
    `model.embed_tokens.weight`."""
    tok = _open_tokenizer(tokenizer)
    bos, eos = (tok.bos_id, tok.eos_id) if tok is not None else (None, None)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model_cfg.dim,
        "intermediate_size": ffn_hidden_dim(model_cfg.dim, model_cfg.multiple_of, model_cfg.ffn_dim_multiplier),
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.n_kv_heads or model_cfg.n_heads,
        "head_dim": model_cfg.dim // model_cfg.n_heads,
        "vocab_size": model_cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "rope_scaling": _rope_scaling_dict(model_cfg.rope_scaling),
        "max_position_embeddings": model_cfg.max_seq_len,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tie_word_embeddings": bool(model_cfg.tie_embeddings),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """ModelConfig fields from HF_DIR/config.json (a Llama). `multiple_of`/`ffn_dim_multiplier`
    are chosen to reproduce `intermediate_size` exactly with torchtitan's formula."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model folder: {path} does not exist")
    c = json.loads(path.read_text())
    where = f"{path}"
    if c.get("model_type", "llama") != "llama":
        raise ConfigError(f"{where}: model_type {c.get('model_type')!r} is not a Llama")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key, want) != want:
            raise ConfigError(f"{where}: {key}={c[key]!r} is not supported (need {want!r})")
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, dim // heads):
        raise ConfigError(f"{where}: head_dim={c['head_dim']} != hidden_size/num_attention_heads = {dim // heads}")
    # transformers 5 writes rope_parameters; 4 writes rope_theta + rope_scaling.
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ConfigError(f"{where}: RoPE type {kind!r} is not supported (default or llama3)")
    scaling = None
    if kind == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings") if rope.get(k) is None]
        if missing:
            raise ConfigError(f"{where}: llama3 RoPE scaling lacks {', '.join(missing)}")
        scaling = RopeScalingConfig(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_seq_len=int(rope["original_max_position_embeddings"]))
    inter = c["intermediate_size"]
    multiple_of, mult = _ffn_params(dim, inter)
    return {
        "dim": dim, "n_layers": c["num_hidden_layers"], "n_heads": heads,
        "n_kv_heads": c.get("num_key_value_heads") or heads, "vocab_size": c["vocab_size"],
        "multiple_of": multiple_of, "ffn_dim_multiplier": mult, "norm_eps": c.get("rms_norm_eps", 1e-5),
        "rope_theta": float(theta), "rope_scaling": scaling,
        "max_seq_len": c.get("max_position_embeddings", 2048),
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),  # LlamaConfig's default
    }


def _ffn_params(dim: int, inter: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) giving width `inter`: common Llama values first, else
    a multiplier that rounds up to exactly `inter`."""
    for mult in (None, 1.3, 1.5, 1.0, 2.0):
        for multiple_of in (1024, 512, 256, 128, 64, 32):
            if ffn_hidden_dim(dim, multiple_of, mult) == inter:
                return multiple_of, mult
    base = int(2 * (4 * dim) / 3)
    mult = None if base <= inter else inter / base
    assert ffn_hidden_dim(dim, inter, mult) == inter
    return inter, mult


def check_hf_config(model_cfg: ModelConfig, hf_dir: str | os.PathLike) -> None:
    """Raise ConfigError naming every setting where `model_cfg` differs from HF_DIR's config."""
    hf = read_hf_config(hf_dir)
    ours = {
        "dim": model_cfg.dim, "n_layers": model_cfg.n_layers, "n_heads": model_cfg.n_heads,
        "n_kv_heads": model_cfg.n_kv_heads or model_cfg.n_heads, "vocab_size": model_cfg.vocab_size,
        "norm_eps": model_cfg.norm_eps, "rope_theta": model_cfg.rope_theta,
        "rope_scaling": model_cfg.rope_scaling,
    }
    diffs = [f"model.{k} = {_show(v)} but {hf_dir}/config.json has {_show(hf[k])}"
             for k, v in ours.items() if v != hf[k]]
    # A tied checkpoint may be trained untied (its head starts as a copy of the embedding); an
    # untied one has two different matrices, which one tied matrix cannot hold.
    if model_cfg.tie_embeddings and not hf["tie_embeddings"]:
        diffs.append(f"model.tie_embeddings = True but {hf_dir}/config.json has tie_word_embeddings "
                     f"false (a separate lm_head.weight)")
    ours_ffn = ffn_hidden_dim(model_cfg.dim, model_cfg.multiple_of, model_cfg.ffn_dim_multiplier)
    hf_ffn = ffn_hidden_dim(hf["dim"], hf["multiple_of"], hf["ffn_dim_multiplier"])
    if ours_ffn != hf_ffn:
        diffs.append(f"feed-forward width {ours_ffn} (model.multiple_of={model_cfg.multiple_of}, "
                     f"model.ffn_dim_multiplier={model_cfg.ffn_dim_multiplier}) but {hf_dir}/config.json "
                     f"has intermediate_size {hf_ffn}")
    if diffs:
        raise ConfigError("model does not match the Hugging Face checkpoint: " + "; ".join(diffs))


def _show(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def resolve_model_shape(cfg: Config) -> Config:
    """`model=hf`: fill every unset (null) shape key, RoPE settings included, from model.init_from's
    config.json, check the keys that were set against it, and validate the whole config again.
    Called once at the entry point on every rank (each reads the small file itself, so all ranks
    agree without communication). A config whose shape is complete is returned as it is."""
    m = cfg.model
    if not m.unset_shape_keys:
        return cfg
    try:
        hf = read_hf_config(m.init_from)
    except ConfigError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    filled = {k: v for k, v in hf.items() if getattr(m, k) is None}
    if m.multiple_of is None:  # the pair reproduces intermediate_size only together
        filled["ffn_dim_multiplier"] = hf["ffn_dim_multiplier"]
    model = dataclasses.replace(m, **filled)
    check_hf_config(model, m.init_from)
    cfg = dataclasses.replace(cfg, model=model)
    cfg.validate()
    log.info("model shape from %s/config.json: %s", m.init_from,
             ", ".join(f"{k}={_show(v)}" for k, v in filled.items()))
    return cfg


# --------------------------------------------------------------------------- export

def _expected_keys(cfg: ModelConfig) -> list[str]:
    return list(build_model(cfg, "meta").state_dict().keys())


def export_hf(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: str | os.PathLike,
              tokenizer: TokenizerArg, dtype: torch.dtype = torch.bfloat16, *,
              heldout_text: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a full (unsharded, our names) state dict as a Hugging Face Llama folder at `out_dir`,
    with `tokenizer` (a tokenizer, its file or a folder holding it; None: no tokenizer).

    Tensors are converted and cast one at a time. The folder is assembled in a temporary sibling
    and renamed into place, so readers never see a half-written export. `heldout_text`, if given,
    is saved as heldout.txt (the default evaluation text of `python -m train.decode`)."""
    _require("safetensors")
    from safetensors.torch import save_file
    keys = _expected_keys(model_cfg)
    missing, extra = set(keys) - set(state_dict), set(state_dict) - set(keys)
    if missing or extra:
        raise ValueError(f"state dict does not match model config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    tok = _open_tokenizer(tokenizer)  # DataError (a ValueError) if it cannot be read
    if tok is not None:
        tok.check_fits(model_cfg.vocab_size)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        adapter = _adapter(model_cfg)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key in keys:
            value = state_dict[key]
            if hasattr(value, "full_tensor"):
                raise TypeError(f"{key} is a DTensor: export_hf needs a full state dict "
                                "(gather it first, e.g. get_model_state_dict(full_state_dict=True))")
            ((hf_key, hf_value),) = adapter.to_hf({key: value.detach()}).items()
            hf_value = hf_value.to(device="cpu", dtype=dtype).contiguous()
            nbytes = hf_value.numel() * hf_value.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][hf_key] = hf_value
            size += nbytes
        _write_shards(shards, tmp, save_file)
        del shards
        config = hf_config_dict(model_cfg, tok, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
               "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tok is not None and tok.path.suffix == ".json":
            _write_hf_tokenizer(tok, tmp)
        elif tok is not None:
            _write_tokenizer(tok.path, tmp)
        if heldout_text is not None:
            (tmp / "heldout.txt").write_text(heldout_text, encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def draft_state_dict(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig,
                     n_blocks: int) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The first `n_blocks` blocks + the embedding, the shared final norm and the head: a Llama of
    depth E = n_blocks whose logits are the full model's exit E (LayerSkip's draft model)."""
    if not 1 <= n_blocks < model_cfg.n_layers:
        raise ValueError(f"--draft-exit must be in [1, {model_cfg.n_layers - 1}] for a "
                         f"{model_cfg.n_layers}-block model, got {n_blocks}")
    kept = {k: v for k, v in state_dict.items()
            if not k.startswith("layers.") or int(k.split(".")[1]) < n_blocks}
    return kept, dataclasses.replace(model_cfg, n_layers=n_blocks)


def export_draft_from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, n_blocks: int) -> Path:
    """A draft folder (`draft_state_dict`) cut from a Hugging Face Llama folder, in the folder's
    dtype, with its tokenizer."""
    hf_dir = Path(hf_dir)
    cfg = ModelConfig(name=hf_dir.name, **read_hf_config(hf_dir))
    dtype = getattr(torch, json.loads((hf_dir / "config.json").read_text()).get("torch_dtype") or "float32")
    state, draft_cfg = draft_state_dict(load_hf_state_dict(hf_dir, cfg), cfg, n_blocks)
    from train.data.tokenizer import find_tokenizer_file
    return export_hf(state, draft_cfg, out_dir, find_tokenizer_file(hf_dir), dtype)  # None: no tokenizer


def _write_shards(shards: list[dict[str, torch.Tensor]], folder: Path, save_file) -> None:
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_tokenizer(model_path: Path, folder: Path) -> None:
    """tokenizer.model (for sentencepiece) plus tokenizer.json + tokenizer_config.json converted by
    transformers from the sentencepiece model itself. Its generic converter follows the model's own
    normalizer settings; LlamaTokenizer would assume Llama 2's and encode our tokenizers wrongly.
    The class is written as PreTrainedTokenizerFast, which transformers 4 and 5 both load."""
    _require("transformers")
    from transformers import PreTrainedTokenizerFast
    import sentencepiece as spm
    shutil.copyfile(model_path, folder / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    specials = {}
    for name, idx in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()),
                      ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id())):
        if idx >= 0:
            specials[name] = sp.id_to_piece(idx)
    cfg_path = folder / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({"tokenizer_class": "TokenizersBackend", **specials,
                                    "add_bos_token": sp.bos_id() >= 0, "add_eos_token": False}))
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    tok.save_pretrained(str(folder))
    cfg = json.loads(cfg_path.read_text())
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _write_hf_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """A tokenizer.json run: that file and its config files as they are (AutoTokenizer reads
    them like the checkpoint they came from). Without a tokenizer_config.json (BOS/EOS named by
    special_tokens_map.json only) one is added: without it AutoTokenizer would pick a class from
    config.json's model type, which may rewrite the tokenizer's own pre-tokenization."""
    copy_tokenizer(tok, folder)
    if not (folder / "tokenizer_config.json").is_file():
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.id_to_token(tok.bos_id),
            "eos_token": tok.id_to_token(tok.eos_id)}, indent=2))


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing `out_dir` is moved aside first and deleted after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- import

def _hf_tensor_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: hf_dir / v for k, v in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")
    _require("safetensors")
    from safetensors import safe_open
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def iter_hf_tensors(hf_dir: str | os.PathLike, model_cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, full tensor) pairs read lazily, one tensor at a time, from HF_DIR's safetensors.
    Checks the config first. A tied checkpoint (tie_word_embeddings, as Llama 3.2 1B) gives a
    tied model its one matrix, tok_embeddings.weight (an lm_head.weight stored beside it is
    ignored, as transformers ignores it); a model configured untied gets a copy of the embedding
    as output.weight (`model.tie_embeddings=false`: the head then trains on its own)."""
    _require("safetensors")
    from safetensors import safe_open
    hf_dir = Path(hf_dir)
    check_hf_config(model_cfg, hf_dir)
    files = _hf_tensor_files(hf_dir)
    adapter = _adapter(model_cfg)
    expected = set(_expected_keys(model_cfg))
    seen: set[str] = set()
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    untie = tied and not model_cfg.tie_embeddings
    by_file: dict[Path, list[str]] = {}
    for k, p in files.items():
        by_file.setdefault(p, []).append(k)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for hf_key in names:
                if tied and hf_key == "lm_head.weight":
                    continue
                try:  # (the adapter drops rotary_emb.inv_freq buffers some exports carry)
                    converted = adapter.from_hf({hf_key: f.get_tensor(hf_key)})
                except KeyError:
                    raise KeyError(f"{path}: tensor {hf_key} is not part of a Llama") from None
                for key, value in converted.items():
                    if key not in expected:
                        raise KeyError(f"{path}: tensor {hf_key} maps to {key}, which the model lacks")
                    seen.add(key)
                    yield key, value
                    if untie and key == "tok_embeddings.weight":
                        seen.add("output.weight")
                        yield "output.weight", value.clone()  # its own storage: untied
    missing = expected - seen
    if missing:
        raise KeyError(f"{hf_dir} lacks tensors for {sorted(missing)[:5]} ({len(missing)} in all)")


def load_hf_state_dict(hf_dir: str | os.PathLike, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The whole checkpoint as a state dict with our names (full tensors in memory)."""
    return dict(iter_hf_tensors(hf_dir, model_cfg))


@torch.no_grad()
def load_into_model(model: nn.Module, hf_dir: str | os.PathLike, model_cfg: ModelConfig) -> None:
    """Copy HF_DIR's weights into `model` in place, one tensor at a time. Works for plain modules
    and for DTensor (FSDP2/TP) parameters: every rank reads the file itself and keeps its own
    shard (`distribute_tensor(..., src_data_rank=None)` slices locally, no communication), so at
    most one full tensor is alive per rank. Non-persistent buffers (freqs_cis) are not touched."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    # Activation checkpointing and compile wrappers insert these into names (as handled by
    # parallel.parallelize.canonical_name); the checkpoint's names have none.
    targets = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v
               for k, v in model.state_dict(keep_vars=True).items()}
    for key, full in iter_hf_tensors(hf_dir, model_cfg):
        if key not in targets:
            raise KeyError(f"the model has no parameter {key} (from {hf_dir})")
        param = targets.pop(key)
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"{key}: {hf_dir} has shape {tuple(full.shape)}, the model {tuple(param.shape)}")
        full = full.to(dtype=param.dtype)
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        else:
            param.copy_(full)
        del full
    if targets:
        raise KeyError(f"{hf_dir} did not provide {sorted(targets)[:5]}")


def load_hf_model(hf_dir: str | os.PathLike, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[LayerSkipLlama, ModelConfig]:
    """A fresh unsharded model with HF_DIR's shape and weights (eval mode)."""
    cfg = ModelConfig(name=Path(hf_dir).name, **read_hf_config(hf_dir))
    cfg.validate()
    model = build_model(cfg, "meta")
    model.to_empty(device=device)
    model.freqs_cis = None  # keep Module.to(dtype) from casting the complex table to real
    model.to(dtype)
    with torch.device(device):
        model.freqs_cis = model._precompute_freqs_cis()  # complex64, as in training
    load_into_model(model, hf_dir, cfg)
    return model.eval(), cfg
