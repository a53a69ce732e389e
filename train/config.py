"""Typed configuration: the schema behind recipes/ and its validation.

Hydra composes YAML from recipes/; `load_config` converts the result once, at the entry point, into
these frozen-by-convention dataclasses. The conversion is strict: an unknown key, a value of the
wrong type or an invalid value raises `ConfigError` naming the full key (for example
`optim.lr`), before any heavy work starts. Components receive only the small config they need.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid setting; the message names the key."""


def _key(name: str, f: dataclasses.Field) -> str:
    return f.metadata.get("key", name)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width torchtitan's Llama FeedForward computes from dim (the one formula here)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class RopeScalingConfig:
    """Llama 3.1/3.2 long-context RoPE frequency scaling (Hugging Face `rope_type: llama3`,
    torchtitan's RoPEScalingArgs): Llama 3.1 uses factor 8, Llama 3.2 factor 32; both low/high
    frequency factors 1 and 4 and an original context of 8192."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192  # HF: original_max_position_embeddings

    def validate(self) -> None:
        if self.factor < 1.0:
            raise ConfigError(f"model.rope_scaling.factor must be >= 1, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(f"model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                              f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.original_max_seq_len <= 0:
            raise ConfigError(f"model.rope_scaling.original_max_seq_len must be positive, got "
                              f"{self.original_max_seq_len}")


# Keys that `model=hf` leaves unset (null) and train.hf.resolve_model_shape fills from
# model.init_from's config.json. n_kv_heads, ffn_dim_multiplier and rope_scaling are also null in
# that preset, but null is a valid value for them, so these decide whether the shape is unresolved.
REQUIRED_SHAPE_KEYS = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "norm_eps",
                       "rope_theta", "max_seq_len", "tie_embeddings")


@dataclass
class ModelConfig:
    """Llama shape. `name` is the preset file in recipes/model/ the values came from. With
    `model=hf` the shape keys are null until train.hf.resolve_model_shape reads them from
    model.init_from's config.json (once, at the entry point)."""
    name: str = "tiny"
    dim: int | None = 256
    n_layers: int | None = 8
    n_heads: int | None = 8
    n_kv_heads: int | None = 4
    vocab_size: int | None = 8192
    multiple_of: int | None = 64
    ffn_dim_multiplier: float | None = None
    norm_eps: float | None = 1e-5
    rope_theta: float | None = 10000.0
    rope_scaling: RopeScalingConfig | None = None  # Llama 3.1+ long-context frequency scaling
    max_seq_len: int | None = 2048
    # One matrix for the token embedding and the output head (Hugging Face tie_word_embeddings:
    # Llama 3.2 1B/3B, SmolLM2); model=hf reads it from model.init_from's config.json.
    tie_embeddings: bool | None = False
    init_from: str | None = None  # Hugging Face Llama folder for continual pretraining
    # causal: every token attends to all earlier tokens of its window. block_causal: only to the
    # earlier tokens of its own packed document (a BOS after an EOS starts one), as Llama 3 was
    # pretrained; FlexAttention on CUDA, a dense mask elsewhere (docs/document_masking.md).
    attention: str = "causal"

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width exactly as torchtitan's FeedForward derives it (hidden_dim = 4 * dim)."""
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def unset_shape_keys(self) -> list[str]:
        """The required shape keys still null (model=hf before its shape is read)."""
        return [k for k in REQUIRED_SHAPE_KEYS if getattr(self, k) is None]

    def validate(self) -> None:
        if self.attention not in ("causal", "block_causal"):
            raise ConfigError(f"model.attention must be causal|block_causal, got {self.attention!r}")
        unset = self.unset_shape_keys
        if unset:
            if self.init_from is None:
                raise ConfigError(
                    f"model.{unset[0]} is not set: model=hf takes the whole shape from a Hugging Face "
                    f"checkpoint, so set model.init_from=HF_DIR (or choose a preset, e.g. model=llama3_8b)")
            return  # checked once the shape has been read from model.init_from
        for k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model.{k} must be positive, got {getattr(self, k)}")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"model.dim / model.n_heads = {self.dim // self.n_heads} must be even (RoPE)")
        kv = self.n_kv_heads or self.n_heads
        if kv <= 0 or self.n_heads % kv:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({kv})")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()


@dataclass
class MixtureSource:
    """One entry of data.mixture: a prepared dataset folder and its share of the train samples."""
    path: str = "???"
    weight: float = 1.0
    name: str | None = None  # label in metrics (default: the folder's name)


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenized and batched (per data-parallel rank)."""
    source: str = "stdlib"  # "stdlib" (embedded default) or a path to .txt/.jsonl/.parquet files or folders
    text_field: str = "text"  # field holding the text in .jsonl / .parquet
    # existing tokenizer: a sentencepiece .model, a Hugging Face tokenizer.json, or a folder holding
    # one; None: model.init_from's tokenizer, else one is trained on the corpus
    tokenizer: str | None = None
    cache_dir: str = ".cache/data"  # prepared tokens and trained tokenizers are cached here
    max_chars: int | None = 20_000_000  # cap on corpus characters read (None: all)
    seq_len: int = 256
    batch_size: int = 8  # sequences per data-parallel rank per micro-batch
    val_fraction: float = 0.02
    num_workers: int = 0
    # Weighted prepared sources ([{path, weight}, ...]); when set, data.source is not read.
    mixture: list[MixtureSource] | None = None
    # A raw data.source over this many bytes is refused at start-up (prepare it offline instead).
    max_auto_prepare_bytes: int = 2_000_000_000
    prepare_wait_s: float = 3600.0  # how long other ranks wait for the main rank's auto-prepare
    # false: no loss on the one target of a window that lies in the next document (an EOS input
    # whose label is the next document's BOS); true counts every target, as before.
    loss_across_documents: bool = True

    def validate(self) -> None:
        for i, m in enumerate(self.mixture or []):
            if not m.path or m.path == "???":
                raise ConfigError(f"data.mixture[{i}].path is missing (a prepared dataset folder)")
            if not m.weight > 0:
                raise ConfigError(f"data.mixture[{i}].weight must be positive, got {m.weight} ({m.path})")
        if self.mixture is not None and not self.mixture:
            raise ConfigError("data.mixture is empty: list at least one {path, weight}, or null")
        if self.max_auto_prepare_bytes <= 0:
            raise ConfigError(f"data.max_auto_prepare_bytes must be positive, got {self.max_auto_prepare_bytes}")
        if self.prepare_wait_s <= 0:
            raise ConfigError(f"data.prepare_wait_s must be positive, got {self.prepare_wait_s}")
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len must be positive, got {self.seq_len}")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_chars is not None and self.max_chars <= 0:
            raise ConfigError(f"data.max_chars must be positive or null, got {self.max_chars}")


@dataclass
class PrepareConfig:
    """`python -m train.data.prepare`: offline tokenization of data.source into prepare.out."""
    out: str | None = None  # the prepared dataset folder to write
    workers: int = 0  # processes on the machine that prepares; 0: all cores
    num_tasks: int | None = None  # machines (tasks) sharing the work; None: Slurm array / torchrun / 1
    task_id: int | None = None  # this task's index in [0, num_tasks)
    finalize: bool = False  # only write the manifest (after all tasks finished their shards)
    shard_bytes: int = 64 * 2**20  # input bytes per shard (large files are split at lines)
    progress: bool = True  # progress bar on stderr

    def validate(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"prepare.workers must be >= 0 (0: all cores), got {self.workers}")
        if self.num_tasks is not None and self.num_tasks < 1:
            raise ConfigError(f"prepare.num_tasks must be >= 1, got {self.num_tasks}")
        if self.task_id is not None and not 0 <= self.task_id < (self.num_tasks or self.task_id + 1):
            raise ConfigError(f"prepare.task_id must be in [0, prepare.num_tasks={self.num_tasks}), "
                              f"got {self.task_id}")
        if self.shard_bytes < 1 << 16:
            raise ConfigError(f"prepare.shard_bytes must be >= 65536, got {self.shard_bytes}")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final LR as a fraction of lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    fused: bool | None = None  # None: fused AdamW where the device supports it

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"optim.{k} must be in [0, 1), got {getattr(self, k)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"optim.schedule must be cosine|wsd|constant, got {self.schedule!r}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")


@dataclass
class DropoutConfig:
    """Per-sample layer dropout: p(l, t) = S(t) * D(l) * p_max (docs/concepts.md)."""
    p_max: float = 0.0
    depth: str = "exp"  # exp | linear | uniform
    time: str = "constant"  # constant | exp | linear
    rates: list[float] | None = None  # explicit per-layer rates, replacing D(l) * p_max
    mode: str = "balanced"  # balanced (same drop count per DP rank) | global (by global sample index)

    def validate(self, n_layers: int) -> None:
        if not 0.0 <= self.p_max <= 1.0:
            raise ConfigError(f"layerskip.dropout.p_max must be in [0, 1], got {self.p_max}")
        if self.depth not in ("exp", "linear", "uniform"):
            raise ConfigError(f"layerskip.dropout.depth must be exp|linear|uniform, got {self.depth!r}")
        if self.time not in ("constant", "exp", "linear"):
            raise ConfigError(f"layerskip.dropout.time must be constant|exp|linear, got {self.time!r}")
        if self.mode not in ("balanced", "global"):
            raise ConfigError(f"layerskip.dropout.mode must be balanced|global, got {self.mode!r}")
        if self.rates is not None:
            if len(self.rates) != n_layers:
                raise ConfigError(
                    f"layerskip.dropout.rates has {len(self.rates)} entries, the model has {n_layers} layers")
            for i, r in enumerate(self.rates):
                if not 0.0 <= r <= 1.0:
                    raise ConfigError(f"layerskip.dropout.rates[{i}] must be in [0, 1], got {r}")

    @property
    def enabled(self) -> bool:
        return self.p_max > 0 or (self.rates is not None and any(r > 0 for r in self.rates))


def parse_exits(spec: Any, n_layers: int, key: str) -> list[int]:
    """Exits E from a list of integers or a slice string, sorted and unique; None or [] gives [].

    An exit is counted in blocks run (E = 1..L; E = L is the full model), as Hugging Face's
    `hidden_states[E]` and `assistant_early_exit=E`, and `--exits` of train.decode and
    train.eval_exits. Integers and slice strings index the list 0..L like Python: -1 is L, '1:' is
    every exit, '4::4' is 4, 8, ...; a slice may run over 0, which is skipped (no block run), but
    an explicit 0 is an error. Errors name `key`."""
    if spec is None or spec == [] or spec == "":
        return []
    depths = list(range(n_layers + 1))  # 0 (no block run: not an exit), 1..L
    if isinstance(spec, str):
        try:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) == 1:
                idx = [parts[0]]
            elif len(parts) <= 3:
                idx = [e for e in depths[slice(*parts)] if e != 0]
            else:
                raise ValueError
        except (ValueError, TypeError):
            raise ConfigError(
                f"{key}: {spec!r} is not a slice string like '1:' or '4::4' (exits E = 1..L)") from None
    elif isinstance(spec, (list, tuple)):
        idx = list(spec)
    else:  # one exit, e.g. `eval.at_exits=4` (Hydra gives an integer)
        idx = [spec]
    out = []
    for i in idx:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ConfigError(f"{key} entries must be integers, got {i!r}")
        e = i + n_layers + 1 if i < 0 else i
        if not 1 <= e <= n_layers:
            raise ConfigError(f"{key}: exit {i} is out of range: exits count blocks run, "
                              f"1..{n_layers} for {n_layers} layers (-1 is {n_layers}, the full model)")
        out.append(e)
    return sorted(set(out))


def _as_exits(spec: Any) -> str | None:
    """The exits (E = block index + 1) that an old block-index setting meant, in the same form
    (None where the old value was not valid either)."""
    def shift(i: Any) -> Any:
        return i + 1 if isinstance(i, int) and not isinstance(i, bool) and i >= 0 else i
    if isinstance(spec, str):
        parts = spec.split(":")
        try:
            if len(parts) == 1:
                return repr(str(shift(int(parts[0]))))
            if len(parts) <= 3:
                new = [str(shift(int(p))) if p.strip() else "" for p in parts[:2]] + parts[2:]
                return repr(":".join(new))
        except ValueError:
            pass
        return None
    if isinstance(spec, (list, tuple)):
        return "[" + ",".join(str(shift(i)) for i in spec) + "]"
    return str(shift(spec)) if isinstance(spec, int) and not isinstance(spec, bool) else None


# Settings that counted exits as block indices (0..L-1) and were renamed when exits became E =
# blocks run. Given with a value they are refused, never reinterpreted: the same digits would name
# the exit one block earlier. Hydra's schema keeps them (null) so a command-line override reaches
# this message instead of Hydra's "not in struct".
RENAMED_KEYS = {"layerskip.exit.layers": "layerskip.exit.exits", "eval.exits": "eval.at_exits"}


def _blocks_of_old_setting(spec: Any, n_layers: int) -> list[int]:
    """The block indices 0..L-1 an old `layerskip.exit.layers` / `eval.exits` value named."""
    if isinstance(spec, str):
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        idx = [parts[0]] if len(parts) == 1 else list(range(n_layers))[slice(*parts)]
    else:
        idx = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    return sorted({i + n_layers if i < 0 else i for i in idx})


def upgrade_saved_config(data: dict) -> dict:
    """A run's config.yaml written before exits were counted in blocks run, with its old block-index
    settings turned into exits (E = index + 1). Only for files the trainer wrote: the key name says
    which numbering the value uses; a user's setting of an old key is refused instead."""
    data = dict(data)
    n_layers = (data.get("model") or {}).get("n_layers")
    for key, new in RENAMED_KEYS.items():
        *path, name = key.split(".")
        parent = data
        for part in path:  # copies along the path: the caller's dict is left as it was
            if not isinstance(parent.get(part), dict):
                break
            parent[part] = dict(parent[part])
            parent = parent[part]
        else:
            if name not in parent:
                continue
            value, new_name = parent.pop(name), new.rsplit(".", 1)[1]
            if value is None or value == [] or value == "":
                parent[new_name] = None
            elif isinstance(n_layers, int):
                parent[new_name] = [l + 1 for l in _blocks_of_old_setting(value, n_layers)]
            else:
                _refuse_renamed(key, value)
    return data


def _refuse_renamed(key: str, value: Any) -> None:
    if value is None:
        return
    new, same = RENAMED_KEYS[key], _as_exits(value)
    raise ConfigError(
        f"{key} was renamed {new}, which counts exits as blocks run (E = 1..L, E = L the full model, "
        f"as train.decode --exits and Hugging Face's assistant_early_exit): E = block index + 1, "
        + (f"so {key}={value!r} is {new}={same}" if same else f"so add 1 to each index of {value!r}"))


@dataclass
class ExitConfig:
    """Early-exit loss through the shared final norm + output head."""
    # Exits E (blocks run, 1..L) that may be in the loss: a list or a slice string like "1:" (all)
    # or "4::4"; None/[] = off. E = L, the model's own output, is always in the loss.
    exits: Any = None
    curriculum: str = "rotational"  # rotational | gradual | fixed
    period: int = 8  # R for the rotational curriculum
    e_scale: float = 0.2
    weighting: str = "paper"  # paper | uniform | linear
    chunk_tokens: int = 4096  # tokens per chunk of exit logits (memory bound: chunk_tokens x vocab)

    def validate(self, n_layers: int) -> None:
        if self.curriculum not in ("rotational", "gradual", "fixed"):
            raise ConfigError(
                f"layerskip.exit.curriculum must be rotational|gradual|fixed, got {self.curriculum!r}")
        if self.period < 1:
            raise ConfigError(f"layerskip.exit.period must be >= 1, got {self.period}")
        if not 0.0 <= self.e_scale <= 1.0:
            raise ConfigError(f"layerskip.exit.e_scale must be in [0, 1], got {self.e_scale}")
        if self.weighting not in ("paper", "uniform", "linear"):
            raise ConfigError(f"layerskip.exit.weighting must be paper|uniform|linear, got {self.weighting!r}")
        if self.chunk_tokens <= 0:
            raise ConfigError(f"layerskip.exit.chunk_tokens must be positive, got {self.chunk_tokens}")
        self.exit_list(n_layers)

    def exit_list(self, n_layers: int) -> list[int]:
        """The early exits E (1..L-1, sorted, unique) allowed in the loss. E = L is not listed: it is
        the model's own output and always in the loss."""
        return [e for e in parse_exits(self.exits, n_layers, "layerskip.exit.exits") if e != n_layers]


@dataclass
class LayerSkipConfig:
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    exit: ExitConfig = field(default_factory=ExitConfig)


@dataclass
class ParallelConfig:
    dp_shard: int = -1  # FSDP degree; -1 takes what dp_replicate and tp leave of the world
    # Replicated data-parallel degree: whole copies that all-reduce gradients (DDP when dp_shard
    # is 1, HSDP when both are > 1). Each replica sees different data, like a shard.
    dp_replicate: int = 1
    tp: int = 1  # tensor-parallel degree
    ac: str = "none"  # none | selective | full activation checkpointing
    compile: bool = False
    reshard_after_forward: bool = True
    timeout_s: float = 300.0  # a collective that takes longer raises instead of hanging
    # Dry run (train/memory_estimate.py): check the layout for this many ranks and print per-rank
    # memory, on one CPU, without training; 0 = a normal run.
    dry_run: int = 0
    dry_run_json: str | None = None  # also write the dry run's figures here
    device_gib: float = 80.0  # device memory the dry run's total is compared with

    def validate(self) -> None:
        if self.ac not in ("none", "selective", "full"):
            raise ConfigError(f"parallel.ac must be none|selective|full, got {self.ac!r}")
        if self.tp < 1:
            raise ConfigError(f"parallel.tp must be >= 1, got {self.tp}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard must be >= 1 or -1, got {self.dp_shard}")
        if self.dp_replicate < 1:
            raise ConfigError(f"parallel.dp_replicate must be >= 1, got {self.dp_replicate}")
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s must be positive, got {self.timeout_s}")
        if self.dry_run < 0:
            raise ConfigError(f"parallel.dry_run must be a world size >= 1, or 0 (off), got {self.dry_run}")
        if self.device_gib <= 0:
            raise ConfigError(f"parallel.device_gib must be positive, got {self.device_gib}")


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps between saves; 0 disables periodic saves (the final step is saved)
    keep: int = 2  # complete checkpoints kept; older ones are deleted
    async_save: bool = field(default=False, metadata={"key": "async"})
    resume: str = "latest"  # latest | none | <step>
    save_final: bool = True

    def validate(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"checkpoint.interval must be >= 0, got {self.interval}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {self.keep}")
        r = str(self.resume)
        if r not in ("latest", "none") and not r.isdigit():
            raise ConfigError(f"checkpoint.resume must be latest|none|<step>, got {self.resume!r}")


@dataclass
class LoggingConfig:
    """Where metrics go (docs/metrics.md lists every key)."""
    every: int = 10
    tensorboard: bool = True
    # Weights & Biases (pip install wandb), from rank 0; one W&B run per run across requeues
    # (train/wandb_sink.py). WANDB_MODE=offline works without network.
    wandb: bool = False
    wandb_project: str = "layerskip-titan"
    wandb_entity: str | None = None  # team or user; None: W&B's default entity
    # Each block's gradient norm every N steps (train/grad_norms.py); 0: off.
    block_grad_norms_every: int = 10
    stragglers: bool = True  # time each rank's own compute to name the slowest (train/stragglers.py)

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError(f"logging.every must be >= 1, got {self.every}")
        if self.block_grad_norms_every < 0:
            raise ConfigError(f"logging.block_grad_norms_every must be >= 0 (0: off), got "
                              f"{self.block_grad_norms_every}")
        if self.wandb and not self.wandb_project:
            raise ConfigError("logging.wandb_project is empty: name the W&B project")


@dataclass
class MonitorConfig:
    """Training stability: loss-spike handling (train/spikes.py), Python's garbage collector
    (train/gc_control.py) and NCCL's flight recorder (train/flight_recorder.py)."""
    spike: str = "warn"  # off | warn | skip: what a loss or gradient-norm spike does
    spike_sigma: float = 6.0  # a spike: more than this many standard deviations above the window
    spike_window: int = 128  # accepted steps in the running window; detection starts once full
    spike_max_skips: int = 5  # consecutive skips, then the new level is accepted (skip mode)
    gc_every: int = 50  # collect garbage every N steps, automatic collection off; 0: Python's own
    nccl_trace_buffer: int = 20000  # flight-recorder entries per rank (unless set in the env); 0: off

    def validate(self) -> None:
        if self.spike not in ("off", "warn", "skip"):
            raise ConfigError(f"monitor.spike must be off|warn|skip, got {self.spike!r}")
        if not self.spike_sigma > 0:
            raise ConfigError(f"monitor.spike_sigma must be positive, got {self.spike_sigma}")
        if self.spike_window < 2:
            raise ConfigError(f"monitor.spike_window must be >= 2, got {self.spike_window}")
        if self.spike_max_skips < 0:
            raise ConfigError(f"monitor.spike_max_skips must be >= 0, got {self.spike_max_skips}")
        if self.gc_every < 0:
            raise ConfigError(f"monitor.gc_every must be >= 0 (0: automatic), got {self.gc_every}")
        if self.nccl_trace_buffer < 0:
            raise ConfigError(f"monitor.nccl_trace_buffer must be >= 0 (0: off), got "
                              f"{self.nccl_trace_buffer}")


@dataclass
class EvalConfig:
    every: int = 100  # steps between validations; 0 disables (a final one still runs)
    batches: int = 8  # validation batches per rank
    per_layer: bool = True  # validate every exit (or eval.at_exits), not only the full model
    # The exits E validated (blocks run, 1..L, as layerskip.exit.exits: a list or a slice string
    # like '4::4'); null: every exit. The full model (E = L) is always validated.
    at_exits: Any = None

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        if self.batches < 1:
            raise ConfigError(f"eval.batches must be >= 1, got {self.batches}")

    def exit_list(self, n_layers: int) -> list[int]:
        """The exits E validated, the full model E = L included (sorted)."""
        if not self.per_layer:
            return [n_layers]
        exits = (list(range(1, n_layers + 1)) if self.at_exits is None
                 else parse_exits(self.at_exits, n_layers, "eval.at_exits"))
        return sorted(set(exits) | {n_layers})


@dataclass
class PreemptConfig:
    """What a preemption signal does: finish the step, save, exit 75 (docs/operations.md)."""
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # [] disables

    def validate(self) -> None:
        import signal
        for i, name in enumerate(self.signals):
            if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"preempt.signals[{i}]: {name!r} is not a signal that can be "
                                  f"handled (e.g. SIGTERM, SIGUSR1)")


@dataclass
class ProfilingConfig:
    """torch.profiler traces of chosen steps, per rank, under RUN_DIR/profile/ (off: no cost)."""
    enable: bool = False
    start_step: int = 3  # first profiled step (1-based, as logged); early steps warm up
    steps: int = 2  # profiled steps
    memory: bool = True  # CUDA: memory snapshot of the profiled steps, and one on out-of-memory

    def validate(self) -> None:
        if self.start_step < 1:
            raise ConfigError(f"profiling.start_step must be >= 1, got {self.start_step}")
        if self.steps < 1:
            raise ConfigError(f"profiling.steps must be >= 1, got {self.steps}")


@dataclass
class RunConfig:
    steps: int = 200
    seed: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step
    dtype: str = "auto"  # auto (bf16 params on GPU, fp32 on CPU) | float32 | bfloat16
    max_nan_steps: int = 0  # consecutive non-finite losses tolerated before stopping

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.seed < 2**63:
            # Seeds key numpy SeedSequences (data order), which refuse negative entries, and torch
            # generators (layer dropout), which would remap them: one rule for both, said up front.
            raise ConfigError(f"train.seed must be an integer in [0, 2**63), got {self.seed}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"train.dtype must be auto|float32|bfloat16, got {self.dtype!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    layerskip: LayerSkipConfig = field(default_factory=LayerSkipConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: RunConfig = field(default_factory=RunConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    run_dir: str | None = None  # default: outputs/<run id>
    experiment: str = "quickstart"

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.parallel.validate()
        self.checkpoint.validate()
        self.logging.validate()
        self.monitor.validate()
        self.eval.validate()
        self.train.validate()
        self.prepare.validate()
        self.preempt.validate()
        self.profiling.validate()
        if self.model.unset_shape_keys:  # model=hf: checked again once the shape is read
            return
        self.layerskip.dropout.validate(self.model.n_layers)
        self.layerskip.exit.validate(self.model.n_layers)
        self.eval.exit_list(self.model.n_layers)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) is longer than the model's context "
                f"model.max_seq_len ({self.model.max_seq_len})")


# --------------------------------------------------------------------------- conversion

def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, f"{key}.")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, strictly (unknown keys are errors)."""
    hints = typing.get_type_hints(cls)
    fields = {_key(f.name, f): f for f in dataclasses.fields(cls)}
    for k in [k for k in data if f"{prefix}{k}" in RENAMED_KEYS]:
        _refuse_renamed(f"{prefix}{k}", data[k])
    data = {k: v for k, v in data.items() if f"{prefix}{k}" not in RENAMED_KEYS}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown setting {prefix}{k}{hint}")
    kwargs = {}
    for k, f in fields.items():
        if k in data:
            kwargs[f.name] = _convert(data[k], hints[f.name], f"{prefix}{k}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Inverse of from_dict (YAML key names, e.g. checkpoint.async)."""
    if dataclasses.is_dataclass(obj):
        return {_key(f.name, f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def load_config(cfg: Any, saved: bool = False) -> Config:
    """Convert a composed Hydra/OmegaConf config (or plain dict) into a validated `Config`.
    saved: `cfg` is a run's config.yaml, written by the trainer (`upgrade_saved_config`)."""
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - hydra is a hard dependency
        pass
    cfg = {k: v for k, v in dict(cfg).items() if k != "hydra"}
    if saved:
        cfg = upgrade_saved_config(cfg)
    config = from_dict(Config, cfg)
    config.validate()
    return config


def register_schemas() -> None:
    """Register the schema's defaults in Hydra's ConfigStore as `layerskip_titan_schema`;
    recipes/train.yaml lists it first, so every key has its typed default even where no YAML sets
    it, and `python -m train --cfg job` shows every key."""
    from hydra.core.config_store import ConfigStore
    node = to_dict(Config())
    for key in RENAMED_KEYS:  # null: a value given for one reaches _refuse_renamed, not Hydra's error
        *path, name = key.split(".")
        parent = node
        for part in path:
            parent = parent[part]
        parent[name] = None
    ConfigStore.instance().store(name="layerskip_titan_schema", node=node)
