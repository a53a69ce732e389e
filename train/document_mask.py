"""Block-causal attention for packed sequences: where each document of a window starts, and the
mask that keeps every token's attention inside its own document.

Training windows are packed documents, `BOS doc EOS BOS doc EOS ...` (train/data/shards.py), cut
at fixed lengths. With `model.attention=block_causal`, a token attends to the earlier tokens of
its own document only, as Llama 3 was pretrained; a document packed among others then computes
exactly what it computes alone, at every exit.

Where documents start: at every BOS that directly follows an EOS (and at the window's first
token). Requiring the pair, rather than any EOS (torchtitan's rule) or any BOS, keeps tokenizers
whose BOS and EOS are the same token (GPT-2 style `<|endoftext|>`) correct: `X doc X X doc X`
splits between the two X, not around each. A window that begins inside a document (its tail)
makes that tail its first document.

The mask comes in two forms, with the same meaning:
- dense (CPU, and any device without FlexAttention's kernels): a boolean [B, 1, S, S] for
  `scaled_dot_product_attention`; FlexAttention has no backward on CPU, this path trains there.
- FlexAttention's BlockMask (CUDA): torchtitan's compiled `create_block_mask`, causal AND same
  document; blocks that are wholly masked (other documents) are skipped, so the cost falls with
  the number of documents instead of rising.
Layer dropout runs a block on some rows of the batch only: `DocumentMask.rows(keep)` gives the
mask of exactly those rows, in either form.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask
from torchtitan.models.attention import create_attention_mask, get_causal_mask_mod

IGNORE_INDEX = -100  # the label the exit losses skip (train/layerskip/exit_loss.py)


def document_starts(tokens: torch.Tensor, bos_id: int, eos_id: int) -> torch.Tensor:
    """[B, S] bool: True where a new document begins (a BOS right after an EOS)."""
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = (tokens[:, 1:] == bos_id) & (tokens[:, :-1] == eos_id)
    return starts


def document_ids(tokens: torch.Tensor, bos_id: int, eos_id: int) -> torch.Tensor:
    """[B, S] int32: the index of each token's document within its window (0, 1, ...)."""
    return document_starts(tokens, bos_id, eos_id).cumsum(dim=1, dtype=torch.int32)


def dense_mask(ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where query q may attend to key k: k <= q, same document."""
    s = ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril_()
    return (causal & (ids[:, :, None] == ids[:, None, :]))[:, None]


def _same_document(ids: torch.Tensor):
    def same_document(b, h, q_idx, kv_idx):
        return ids[b, q_idx] == ids[b, kv_idx]
    return same_document


def _mask_mod(ids: torch.Tensor):
    return and_masks(get_causal_mask_mod(), _same_document(ids))


def block_mask(ids: torch.Tensor, compiled: bool = True) -> BlockMask:
    """FlexAttention's BlockMask of the same mask (one per row; heads share it). compiled: through
    torchtitan's compiled create_block_mask (fast on GPU; its first call compiles, which takes
    long on a CPU); False: torch's eager one (same result)."""
    b, s = ids.shape
    create = create_attention_mask if compiled else create_block_mask
    return create(_mask_mod(ids), b, None, s, s, device=ids.device)


@dataclass
class DocumentMask:
    """The block-causal mask of one batch, in the form the device runs (see the module doc)."""
    ids: torch.Tensor  # [B, S] document index of each token
    mask: torch.Tensor | BlockMask

    def rows(self, keep: torch.Tensor | None) -> torch.Tensor | BlockMask:
        """The mask of rows `keep` (all rows when None), for a block run on those rows only."""
        if keep is None:
            return self.mask
        if isinstance(self.mask, torch.Tensor):
            return self.mask.index_select(0, keep)
        sub = self.mask[keep]  # the kept rows' block tables ...
        # ... and a mask_mod that reads the kept rows' documents (BlockMask slicing leaves a
        # mask_mod that refuses to run, since the old one indexes rows of the full batch).
        sub.mask_mod = _mask_mod(self.ids.index_select(0, keep))
        return sub


@dataclass(frozen=True)
class DocumentBoundaries:
    """The tokenizer's BOS and EOS ids: what a model needs to find documents in its input.
    flex: the form of the mask (see `mask`); None: FlexAttention on CUDA, dense elsewhere."""
    bos_id: int
    eos_id: int
    flex: bool | None = None

    def __post_init__(self) -> None:
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"document masking needs BOS and EOS ids, got bos={self.bos_id}, eos={self.eos_id}")

    def mask(self, tokens: torch.Tensor, flex: bool | None = None) -> DocumentMask:
        """The mask of a batch of token ids [B, S]. flex: BlockMask (FlexAttention) or dense;
        None: `self.flex`, and if that is None too, FlexAttention on CUDA, dense elsewhere."""
        ids = document_ids(tokens, self.bos_id, self.eos_id)
        flex = self.flex if flex is None else flex
        if flex is None:
            flex = tokens.is_cuda
        return DocumentMask(ids, block_mask(ids) if flex else dense_mask(ids))

    def cross_document_targets(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: targets that belong to the next document (an EOS input whose label is
        the next document's BOS)."""
        return (inputs == self.eos_id) & (labels == self.bos_id)

    def without_cross_document_targets(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`labels` with the cross-document targets set to the ignored label (no loss there)."""
        return labels.masked_fill(self.cross_document_targets(inputs, labels), IGNORE_INDEX)
