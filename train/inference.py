"""KV-cache inference over a trained LayerSkipLlama: greedy decoding and self-speculative decoding.

Self-speculative decoding (LayerSkip, section 4): the first E blocks + the shared head draft d tokens
greedily; the remaining L - E blocks verify them in one pass. Nothing is computed twice: the draft
fills the first E blocks' KV cache, and the exit hidden states of the drafted tokens are the inputs
the verifier feeds to blocks E..L-1. The output equals ordinary greedy decoding token for token.

The engine reuses the model's own modules and weights (plain, unsharded, one process); attention
differs from the model's only in reading keys/values from the cache. Prompts are batch size 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torchtitan.models.llama3.model.model import apply_rotary_emb

from train.model import LayerSkipLlama


@dataclass
class BlockCache:
    """Keys and values of one block, [B, n_kv_heads, max_len, head_dim]; positions >= `length`
    are stale (rolled back or never written) and never attended to."""
    k: torch.Tensor
    v: torch.Tensor
    length: int = 0


class CachedLlama:
    """Runs any contiguous range of a model's blocks over new positions, with a KV cache per block."""

    def __init__(self, model: LayerSkipLlama) -> None:
        self.model = model
        self.n_layers = model.n_layers
        self.caches: list[BlockCache] = []

    def reset(self, batch_size: int, max_len: int) -> None:
        """Empty caches with room for positions 0..max_len-1."""
        limit = self.model.freqs_cis.shape[0]
        if max_len > limit:
            raise ValueError(f"{max_len} positions exceed the model's context (max_seq_len={limit}); "
                             "use a shorter prompt or fewer new tokens")
        attn = self.model.layers["0"].attention
        w = attn.wk.weight
        shape = (batch_size, attn.n_kv_heads, max_len, attn.head_dim)
        self.caches = [BlockCache(torch.empty(shape, dtype=w.dtype, device=w.device),
                                  torch.empty(shape, dtype=w.dtype, device=w.device))
                       for _ in range(self.n_layers)]

    def truncate(self, length: int) -> None:
        """Roll every block's cache back to its first `length` positions."""
        for c in self.caches:
            c.length = min(c.length, length)

    def _attention(self, layer: int, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        attn, cache = self.model.layers[str(layer)].attention, self.caches[layer]
        if start_pos > cache.length:
            raise RuntimeError(f"block {layer}: writing position {start_pos} after only {cache.length} "
                               "cached positions would leave a gap")
        B, T, _ = x.shape
        q = attn.wq(x).view(B, T, -1, attn.head_dim)
        k = attn.wk(x).view(B, T, -1, attn.head_dim)
        v = attn.wv(x).view(B, T, -1, attn.head_dim)
        positions = torch.arange(start_pos, start_pos + T, device=x.device).unsqueeze(0)
        q, k = apply_rotary_emb(q, k, self.model.freqs_cis, positions=positions)
        end = start_pos + T
        cache.k[:, :, start_pos:end] = k.transpose(1, 2)
        cache.v[:, :, start_pos:end] = v.transpose(1, 2)
        cache.length = end
        # Query i (position start_pos + i) sees keys 0..start_pos + i; one query sees them all.
        mask = None
        if T > 1:
            mask = torch.arange(end, device=x.device) <= positions.view(T, 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k[:, :, :end], cache.v[:, :, :end],
                                             attn_mask=mask, enable_gqa=attn.enable_gqa)
        return attn.wo(out.transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def forward_cached(self, x: torch.Tensor, start_pos: int,
                       blocks: tuple[int, int] | None = None) -> torch.Tensor:
        """Run blocks first..last-1 (default: all) over positions start_pos..start_pos+T-1 and
        return their output hidden state [B, T, D] (pre-norm). `x` is token ids [B, T] when the
        range starts at block 0, else the hidden state entering block `first`."""
        first, last = blocks if blocks is not None else (0, self.n_layers)
        if not 0 <= first < last <= self.n_layers:
            raise ValueError(f"block range ({first}, {last}) is invalid for {self.n_layers} blocks")
        h = self.model.tok_embeddings(x) if first == 0 else x
        for layer in range(first, last):
            block = self.model.layers[str(layer)]
            h = h + self._attention(layer, block.attention_norm(h), start_pos)
            h = h + block.feed_forward(block.ffn_norm(h))
        return h

    @torch.no_grad()
    def logits_at_exit(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of any block's output through the shared final norm + head."""
        return self.model.unembed(h)


@dataclass
class Generation:
    """Generated tokens (prompt excluded) and how they were obtained."""
    tokens: list[int]
    wall_s: float
    verify_passes: int = 0  # full-model passes after the prompt (greedy: one per token)
    drafted: int = 0
    accepted: int = 0
    rounds: list[int] = field(default_factory=list, repr=False)  # accepted drafts per round

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else float("inf")


def _prompt(prompt_ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).flatten()
    if ids.numel() == 0:
        raise ValueError("the prompt is empty")
    return ids.unsqueeze(0)


def _finish(tokens: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    tokens = tokens[:max_new_tokens]
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[:tokens.index(eos_id) + 1]
    return tokens


@torch.no_grad()
def greedy_generate(model: LayerSkipLlama, prompt_ids: Sequence[int] | torch.Tensor,
                    max_new_tokens: int, eos_id: int | None = None) -> Generation:
    """Ordinary greedy decoding with the full model and a KV cache; stops after `eos_id`."""
    t0 = time.perf_counter()
    engine = CachedLlama(model)
    prompt = _prompt(prompt_ids, model.freqs_cis.device)
    P = prompt.shape[1]
    engine.reset(1, P + max_new_tokens)
    h = engine.forward_cached(prompt, 0)
    out = [int(engine.logits_at_exit(h[:, -1]).argmax(-1))]
    passes = 0
    while len(out) < max_new_tokens and out[-1] != eos_id:
        h = engine.forward_cached(prompt.new_tensor([[out[-1]]]), P + len(out) - 1)
        out.append(int(engine.logits_at_exit(h[:, -1]).argmax(-1)))
        passes += 1
    return Generation(_finish(out, max_new_tokens, eos_id), time.perf_counter() - t0, verify_passes=passes)


@torch.no_grad()
def self_speculative_generate(model: LayerSkipLlama, prompt_ids: Sequence[int] | torch.Tensor,
                              max_new_tokens: int, exit_layer: int, draft_len: int,
                              eos_id: int | None = None) -> Generation:
    """Greedy self-speculative decoding: draft `draft_len` tokens with the first `exit_layer` blocks
    (E, 1 <= E < L), verify them with blocks E..L-1 in one pass. Same tokens as greedy_generate."""
    L, E = model.n_layers, exit_layer
    if not 1 <= E < L:
        raise ValueError(f"exit_layer must be in [1, {L - 1}] for a {L}-block model, got {E}")
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    t0 = time.perf_counter()
    engine = CachedLlama(model)
    prompt = _prompt(prompt_ids, model.freqs_cis.device)
    P = prompt.shape[1]
    engine.reset(1, P + max_new_tokens)
    h = engine.forward_cached(prompt, 0)  # the prompt through the full model
    out = [int(engine.logits_at_exit(h[:, -1]).argmax(-1))]
    result = Generation([], 0.0)

    def exit_step(token: int, pos: int) -> torch.Tensor:
        """One token through blocks 0..E-1 (extending their caches): its exit hidden state."""
        return engine.forward_cached(prompt.new_tensor([[token]]), pos, (0, E))

    # Invariant: every block has cached positions 0..p-1, and out[-1] sits at p, not yet cached.
    while len(out) < max_new_tokens and out[-1] != eos_id:
        p = P + len(out) - 1
        budget = min(draft_len, max_new_tokens - len(out) - 1)  # never draft past the last token
        seq, exits = [out[-1]], []  # seq[0] is the last accepted token, seq[1:] the drafts
        while len(seq) - 1 < budget and seq[-1] != eos_id:
            exits.append(exit_step(seq[-1], p + len(seq) - 1))
            seq.append(int(engine.logits_at_exit(exits[-1][:, -1]).argmax(-1)))
        # The last draft has not been through the first E blocks yet; then all of seq goes
        # through the remaining blocks at once. Prediction i is the full model's token after seq[i].
        exits.append(exit_step(seq[-1], p + len(seq) - 1))
        h = engine.forward_cached(torch.cat(exits, dim=1), p, (E, L))
        full = engine.logits_at_exit(h[0]).argmax(-1).tolist()
        drafts = seq[1:]
        k = 0
        while k < len(drafts) and drafts[k] == full[k]:
            k += 1
        new = drafts[:k] + [full[k]]  # accepted drafts + the full model's own next token
        out += new
        engine.truncate(p + k + 1)  # keep seq[0..k]; the rejected drafts' keys/values go
        result.drafted += len(drafts)
        result.accepted += k
        result.verify_passes += 1
        result.rounds.append(k)
        if eos_id in new:  # EOS accepted or predicted: the text ends there
            break
    result.tokens = _finish(out, max_new_tokens, eos_id)
    result.wall_s = time.perf_counter() - t0
    return result
