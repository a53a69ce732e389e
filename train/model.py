"""The Llama model: torchtitan 0.2.2's Llama 3 Transformer, extended for early exit.

We subclass rather than fork, so torchtitan's blocks, init, TP plan, FLOP count and Hugging Face
state-dict adapter apply unchanged. What we add:
- `unembed(h)`: final norm + output projection, the one head every exit shares;
- tied embeddings (`ModelConfig.tie_embeddings`, Hugging Face `tie_word_embeddings`): the output
  projection's weight *is* the token embedding's Parameter, as in torchtitan's Qwen3
  (`enable_weight_tying`); the state dict holds it once, as `tok_embeddings.weight`;
- `forward(tokens, keep=..., capture=..., loss_fn=...)`: per-layer subsets of kept samples (layer
  dropout computes only those; the rest pass through unchanged), hidden states captured after
  chosen blocks, and a loss computed *inside* the root forward, so FSDP2's root hooks cover the
  head's parameters for every exit;
- document masking (`documents=DocumentBoundaries(bos, eos)`, model.attention=block_causal):
  the forward finds the documents in its input tokens and every block attends within them only,
  each block with the mask of the rows it runs on (train/document_mask.py).
The model knows nothing of how `keep` or the loss are chosen (train/layerskip/ does).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torchtitan.models.llama3 import Transformer, TransformerModelArgs
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.models.utils import get_dense_model_nparams_and_flops

from train.config import ModelConfig
from train.document_mask import DocumentBoundaries, DocumentMask
from train.masked_attention import MaskedAttention

# A loss over the final hidden state and the captured ones; called inside forward.
LossFn = Callable[["LayerSkipLlama", torch.Tensor, dict[int, torch.Tensor]], object]


def model_args(cfg: ModelConfig) -> TransformerModelArgs:
    """torchtitan args for our config. Without rope_scaling the scaling factor is 1, which leaves
    the frequencies untouched (Llama 2 and our small models)."""
    rs = cfg.rope_scaling
    scaling = RoPEScalingArgs(scaling_factor=1.0) if rs is None else RoPEScalingArgs(
        scaling_factor=rs.factor, low_freq_factor=rs.low_freq_factor,
        high_freq_factor=rs.high_freq_factor, original_max_position_embeddings=rs.original_max_seq_len)
    return TransformerModelArgs(
        dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
        vocab_size=cfg.vocab_size, multiple_of=cfg.multiple_of,
        ffn_dim_multiplier=cfg.ffn_dim_multiplier, norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling_args=scaling, max_seq_len=cfg.max_seq_len,
    )


class LayerSkipLlama(Transformer):
    """torchtitan's Llama with exits through the shared head and per-sample block subsets."""

    def __init__(self, args: TransformerModelArgs, tie_embeddings: bool = False,
                 documents: DocumentBoundaries | None = None):
        super().__init__(args)
        self.tie_embeddings = tie_embeddings
        # None: plain causal attention over the whole window (torchtitan's blocks untouched).
        self.documents = documents
        if documents is not None:
            for block in self.layers.values():
                block.attention = MaskedAttention(args)  # same parameters, also takes a mask
        if tie_embeddings:
            self.tie_weights()
            # One matrix, one state-dict entry: checkpoints and exports hold it once.
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_fill_tied_head)
            self.register_load_state_dict_post_hook(_retie)

    def tie_weights(self) -> None:
        """Make the output projection use the embedding's Parameter (again). Needed after anything
        that replaces Parameters module by module: `to_empty` / `to` (see `_apply`), tensor
        parallelism's sharding, a load with assign=True. A no-op for an untied model."""
        if self.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse=True):
        # Module._apply converts each module's Parameters on its own: from the meta device (and
        # between devices) the two modules would come out with two separate Parameters.
        result = super()._apply(fn, recurse)
        self.tie_weights()
        return result

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        # torchtitan initialises the embedding, then the head (truncated normal, std dim^-0.5):
        # tied, the head's init is the shared matrix's, as torchtitan's Qwen3 does.
        self.tie_weights()
        super().init_weights(buffer_device=buffer_device)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of hidden state `h` (after any block) through the final norm and output head."""
        return self.output(self.norm(h))

    def run_block(self, layer_id: int, h: torch.Tensor, keep: torch.Tensor | None,
                  mask: DocumentMask | None = None) -> torch.Tensor:
        """Block `layer_id` on the rows `keep` of h (all when None); `mask`: the batch's document
        mask, of which the block gets the same rows."""
        block = self.layers[str(layer_id)]
        if keep is None:
            return block(h, self.freqs_cis, attention_masks=None if mask is None else mask.rows(None))
        # Layer dropout: run the block on the kept samples only; dropped samples pass through.
        if keep.numel() == 0:
            # Every sample dropped on this rank. The block must still run forward and backward
            # here, or this rank would skip FSDP2's all-gather / reduce-scatter that the others
            # join, and training would hang. One sample's work, added times zero (exact).
            first = torch.zeros(1, dtype=torch.long, device=h.device)
            out = block(h[:1], self.freqs_cis, attention_masks=None if mask is None else mask.rows(first))
            return h + 0.0 * out.sum()
        sub = h.index_select(0, keep)
        # One compiled graph for every kept count (0 and 1 may each add one specialisation).
        torch._dynamo.maybe_mark_dynamic(sub, 0)
        sub_mask = None if mask is None else mask.rows(keep)
        if isinstance(sub_mask, torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(sub_mask, 0)
        out = block(sub, self.freqs_cis, attention_masks=sub_mask)
        return h.index_copy(0, keep, out)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        keep: Sequence[torch.Tensor | None] | None = None,
        capture: Sequence[int] = (),
        loss_fn: LossFn | None = None,
    ):
        """tokens [B, S] -> logits [B, S, V], or `(h_last, {l: h_l})` if `capture` is given, or
        `loss_fn(self, h_last, {l: h_l})` if a loss is given. `h_l` is the output of block l (after
        l + 1 blocks), before the final norm. `keep[l]` holds the indices of samples block l runs
        on (None: all). With `documents`, every block (hence every exit) attends within each
        packed document only."""
        if keep is not None and len(keep) != self.n_layers:
            raise ValueError(f"keep has {len(keep)} entries for {self.n_layers} layers")
        capture = set(capture)
        mask = None if self.documents is None else self.documents.mask(tokens)
        h = self.tok_embeddings(tokens)
        hidden: dict[int, torch.Tensor] = {}
        for l in range(self.n_layers):
            h = self.run_block(l, h, None if keep is None else keep[l], mask)
            if l in capture:
                hidden[l] = h
        if loss_fn is not None:
            return loss_fn(self, h, hidden)
        if capture:
            return h, hidden
        return self.unembed(h)


def _drop_tied_head(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + "output.weight", None)


def _fill_tied_head(module, state_dict, prefix, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
    # The head loads the embedding's entry into the very same Parameter (a second copy of equal
    # values), so a strict load of a one-matrix state dict finds nothing missing.
    key = prefix + "tok_embeddings.weight"
    if key in state_dict and prefix + "output.weight" not in state_dict:
        state_dict[prefix + "output.weight"] = state_dict[key]


def _retie(module, incompatible_keys) -> None:
    module.tie_weights()  # a load with assign=True gave the two modules separate Parameters


def build_model(cfg: ModelConfig, device: torch.device | str = "meta",
                documents: DocumentBoundaries | None = None) -> LayerSkipLlama:
    """Construct on `device` without initialising (meta by default: no memory). Call
    `init_model` after parallelisation to allocate and initialise the local shards. `documents`
    (the tokenizer's BOS/EOS) turns on document masking: pass it where cfg.attention is
    block_causal (`document_boundaries`); without it attention is causal over the window, which
    is the same for a sequence that holds one document (decoding, the Hugging Face export)."""
    with torch.device(device):
        return LayerSkipLlama(model_args(cfg), tie_embeddings=bool(cfg.tie_embeddings), documents=documents)


def document_boundaries(cfg: ModelConfig, tokenizer) -> DocumentBoundaries | None:
    """What `build_model` needs for cfg.attention: the tokenizer's BOS/EOS for block_causal,
    None for causal."""
    if cfg.attention == "causal":
        return None
    return DocumentBoundaries(int(tokenizer.bos_id), int(tokenizer.eos_id))


@torch.no_grad()
def init_model(model: LayerSkipLlama, device: torch.device | str, seed: int) -> LayerSkipLlama:
    """Allocate (possibly sharded) parameters on `device` and initialise them with torchtitan's
    init. Seeded so every layout initialises the same full weights (DTensor random ops are
    layout-invariant)."""
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights(buffer_device=torch.device(device))
    return model


def flops_per_token(cfg: ModelConfig, model: nn.Module, seq_len: int) -> tuple[int, float, float]:
    """(parameters, training FLOPs per token of the whole model, FLOPs per token of one block's
    forward + backward). torchtitan's count: 6 * non-embedding params + attention. The shared
    matrix of a tied model is counted once as a parameter, and its head matmul as FLOPs."""
    args = model_args(cfg)
    n_params, total = get_dense_model_nparams_and_flops(args, model, 2 * (cfg.dim // cfg.n_heads), seq_len)
    head = 6 * cfg.dim * cfg.vocab_size
    if cfg.tie_embeddings:  # torchtitan subtracts the (only) matrix as an embedding
        total += head
    per_block = (total - head) / cfg.n_layers
    return n_params, float(total), float(per_block)
