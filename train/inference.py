"""KV-cache inference over a trained LayerSkipLlama: plain and self-speculative decoding, greedy or
sampled, for a batch of prompts.

Self-speculative decoding (LayerSkip, section 4): the first E blocks + the shared head draft d tokens;
the remaining L - E blocks verify them in one pass. Nothing is computed twice: the draft fills the
first E blocks' KV cache, and the exit hidden states of the drafted tokens are the inputs the
verifier feeds to blocks E..L-1.

- Greedy (no `Sampling`, or temperature 0): a draft is accepted while it equals the full model's
  argmax; the output equals ordinary greedy decoding token for token.
- Sampling (temperature, top-k, top-p): standard speculative sampling (Leviathan et al. 2023,
  Chen et al. 2023). The draft samples x from q (exit E's warped distribution); the verifier
  accepts it with probability min(1, p(x) / q(x)) (p: the full model's warped distribution at the
  same position); at the first rejection it samples from norm(max(0, p - q)) instead and the round
  ends; when every draft is accepted it samples one more token from p. Every token is then
  distributed exactly as in plain sampling from the full model with the same warping.
- Batches: every row has its own cache length and positions (rows accept different numbers of
  drafts), prompts may differ in length; a row leaves the batch when it is finished.

The engine reuses the model's own modules and weights (plain, unsharded, one process); attention
differs from the model's only in reading keys/values from the cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torchtitan.models.llama3.model.model import apply_rotary_emb

from train.model import LayerSkipLlama


# --------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (argmax); otherwise the logits are
    divided by `temperature`, cut to the `top_k` most likely tokens (0: no cut) and to the smallest
    set whose probability reaches `top_p` (1: no cut) -- Hugging Face's order and semantics -- and
    the token is drawn from what is left. `seed` makes the draws reproducible."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The warped distribution over the last dimension, in float32."""
        logits = logits.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            # Drop a token when the tokens more likely than it already reach top_p (the first stays).
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)


GREEDY = Sampling()


def _draw(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` [..., V] -> [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).view(probs.shape[:-1])


# --------------------------------------------------------------------------- cached model

@dataclass
class BlockCache:
    """Keys and values of one block, [B, n_kv_heads, max_len, head_dim]. Row b's positions
    >= lengths[b] (kept by the engine) are stale -- rolled back or never written -- and are never
    attended to: a query only sees keys at positions up to its own."""
    k: torch.Tensor
    v: torch.Tensor


class _Positions:
    """Where T new tokens of every row go: row b's positions starts[b]..starts[b]+T-1, and the
    attention mask letting query i of row b see that row's keys 0..starts[b]+i."""

    def __init__(self, starts: list[int], T: int, device: torch.device) -> None:
        self.starts, self.end = starts, max(starts) + T
        self.uniform = all(s == starts[0] for s in starts)
        offsets = torch.arange(T, device=device)
        if self.uniform:  # one position range for the whole batch: slices, and no mask for one query
            self.positions = (starts[0] + offsets).unsqueeze(0)
            self.rows = None
        else:
            self.positions = torch.tensor(starts, device=device)[:, None] + offsets
            self.rows = torch.arange(len(starts), device=device)[:, None].expand(len(starts), T)
        self.mask = None
        if T > 1 or not self.uniform:
            self.mask = (torch.arange(self.end, device=device) <= self.positions[..., None]).unsqueeze(1)


class CachedLlama:
    """Runs any contiguous range of a model's blocks over new positions of a batch, with a KV cache
    per block and a cache length per row per block."""

    def __init__(self, model: LayerSkipLlama) -> None:
        self.model = model
        self.n_layers = model.n_layers
        self.caches: list[BlockCache] = []
        self.lengths: list[list[int]] = []  # [block][row]

    def reset(self, batch_size: int, max_len: int) -> None:
        """Empty caches with room for positions 0..max_len-1 in each of `batch_size` rows."""
        limit = self.model.freqs_cis.shape[0]
        if max_len > limit:
            raise ValueError(f"{max_len} positions exceed the model's context (max_seq_len={limit}); "
                             "use a shorter prompt or fewer new tokens")
        attn = self.model.layers["0"].attention
        w = attn.wk.weight
        shape = (batch_size, attn.n_kv_heads, max_len, attn.head_dim)
        # Zeros, not empty: in a ragged batch a row's masked-out keys/values still enter the
        # attention product with weight 0, and 0 * (uninitialised NaN) would be NaN.
        self.caches = [BlockCache(torch.zeros(shape, dtype=w.dtype, device=w.device),
                                  torch.zeros(shape, dtype=w.dtype, device=w.device))
                       for _ in range(self.n_layers)]
        self.lengths = [[0] * batch_size for _ in range(self.n_layers)]

    def truncate(self, lengths: int | Sequence[int]) -> None:
        """Roll every block's cache back to its first `lengths[b]` positions in row b (an int: the
        same for every row)."""
        for row_lengths in self.lengths:
            new = [lengths] * len(row_lengths) if isinstance(lengths, int) else lengths
            row_lengths[:] = [min(a, b) for a, b in zip(row_lengths, new)]

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Drop every other row (finished sequences) from the caches."""
        index = torch.tensor(rows, device=self.caches[0].k.device)
        for c in self.caches:
            c.k, c.v = c.k.index_select(0, index), c.v.index_select(0, index)
        self.lengths = [[row_lengths[r] for r in rows] for row_lengths in self.lengths]

    def _attention(self, layer: int, x: torch.Tensor, where: "_Positions") -> torch.Tensor:
        attn, cache, lengths = self.model.layers[str(layer)].attention, self.caches[layer], self.lengths[layer]
        starts = where.starts
        if any(s > n for s, n in zip(starts, lengths)):
            raise RuntimeError(f"block {layer}: writing positions {starts} after only {lengths} "
                               "cached positions would leave a gap")
        B, T, _ = x.shape
        q = attn.wq(x).view(B, T, -1, attn.head_dim)
        k = attn.wk(x).view(B, T, -1, attn.head_dim)
        v = attn.wv(x).view(B, T, -1, attn.head_dim)
        q, k = apply_rotary_emb(q, k, self.model.freqs_cis, positions=where.positions)
        if where.uniform:
            cache.k[:, :, starts[0]:where.end] = k.transpose(1, 2)
            cache.v[:, :, starts[0]:where.end] = v.transpose(1, 2)
        else:
            cache.k[where.rows, :, where.positions] = k
            cache.v[where.rows, :, where.positions] = v
        lengths[:] = [s + T for s in starts]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k[:, :, :where.end], cache.v[:, :, :where.end],
                                             attn_mask=where.mask, enable_gqa=attn.enable_gqa)
        return attn.wo(out.transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def forward_cached(self, x: torch.Tensor, start_pos: int | Sequence[int],
                       blocks: tuple[int, int] | None = None) -> torch.Tensor:
        """Run blocks first..last-1 (default: all) over positions start..start+T-1 of every row
        (`start_pos`: one int, or one per row) and return their output hidden state [B, T, D]
        (pre-norm). `x` is token ids [B, T] when the range starts at block 0, else the hidden state
        entering block `first`."""
        first, last = blocks if blocks is not None else (0, self.n_layers)
        if not 0 <= first < last <= self.n_layers:
            raise ValueError(f"block range ({first}, {last}) is invalid for {self.n_layers} blocks")
        starts = [start_pos] * x.shape[0] if isinstance(start_pos, int) else list(start_pos)
        where = _Positions(starts, x.shape[1], x.device)  # shared by every block of the range
        h = self.model.tok_embeddings(x) if first == 0 else x
        for layer in range(first, last):
            block = self.model.layers[str(layer)]
            h = h + self._attention(layer, block.attention_norm(h), where)
            h = h + block.feed_forward(block.ffn_norm(h))
        return h

    @torch.no_grad()
    def logits_at_exit(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of any block's output through the shared final norm + head."""
        return self.model.unembed(h)


# --------------------------------------------------------------------------- generation

@dataclass
class Generation:
    """One prompt's generated tokens (prompt excluded) and how they were obtained. In a batch,
    `wall_s` is the whole batch's time."""
    tokens: list[int]
    wall_s: float
    verify_passes: int = 0  # full-model passes after the prompt (plain decoding: one per token)
    drafted: int = 0
    accepted: int = 0
    rounds: list[int] = field(default_factory=list, repr=False)  # accepted drafts per round

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else float("inf")


def _prompt_batch(prompts: Sequence[Sequence[int]] | torch.Tensor,
                  device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Right-padded token ids [B, max_len] and each prompt's length."""
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows:
        raise ValueError("no prompts")
    if any(r.numel() == 0 for r in rows):
        raise ValueError("a prompt is empty")
    lengths = [r.numel() for r in rows]
    batch = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for b, r in enumerate(rows):
        batch[b, :r.numel()] = r
    return batch.to(device), lengths


def _single(prompt_ids) -> bool:
    """One prompt (a flat list of ids or a 1-D tensor) rather than a batch of them."""
    if isinstance(prompt_ids, torch.Tensor):
        return prompt_ids.ndim <= 1
    return len(prompt_ids) == 0 or not isinstance(prompt_ids[0], (list, tuple, torch.Tensor))


def _finish(tokens: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    tokens = tokens[:max_new_tokens]
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[:tokens.index(eos_id) + 1]
    return tokens


def _done(tokens: list[int], max_new_tokens: int, eos_id: int | None) -> bool:
    return len(tokens) >= max_new_tokens or (eos_id is not None and eos_id in tokens)


def _pick(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    return logits.argmax(-1) if sampling.greedy else _draw(sampling.probs(logits), gen)


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.greedy or sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


class _Batch:
    """Bookkeeping shared by both decoders: outputs per prompt, which rows are still running."""

    def __init__(self, model: LayerSkipLlama, prompts, max_new_tokens: int, sampling: Sampling | None,
                 eos_id: int | None) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.t0 = time.perf_counter()
        self.device = model.freqs_cis.device
        self.sampling = sampling or GREEDY
        self.gen = _generator(self.sampling, self.device)
        self.max_new, self.eos = max_new_tokens, eos_id
        self.engine = CachedLlama(model)
        ids, self.prompt_lens = _prompt_batch(prompts, self.device)
        self.results = [Generation([], 0.0) for _ in self.prompt_lens]
        self.engine.reset(len(self.prompt_lens), max(self.prompt_lens) + max_new_tokens)
        h = self.engine.forward_cached(ids, 0)  # the prompts through the full model
        last = torch.tensor([n - 1 for n in self.prompt_lens], device=self.device)
        logits = self.engine.logits_at_exit(h[torch.arange(len(last), device=self.device), last])
        for r, t in zip(self.results, _pick(logits, self.sampling, self.gen).tolist()):
            r.tokens.append(t)
        self.engine.truncate(self.prompt_lens)  # the padding after a short prompt is stale
        self.active = list(range(len(self.results)))  # prompt index of each engine row
        self._drop_finished()

    def positions(self) -> list[int]:
        """Each running row's position of its last token (not yet cached)."""
        return [self.prompt_lens[i] + len(self.results[i].tokens) - 1 for i in self.active]

    def last_tokens(self) -> torch.Tensor:
        return torch.tensor([[self.results[i].tokens[-1]] for i in self.active], device=self.device)

    def _drop_finished(self) -> None:
        keep = [row for row, i in enumerate(self.active) if not _done(self.results[i].tokens, self.max_new, self.eos)]
        if len(keep) < len(self.active):
            self.active = [self.active[row] for row in keep]
            if keep:
                self.engine.keep_rows(keep)

    def step_done(self) -> None:
        self._drop_finished()

    def finish(self) -> list[Generation]:
        wall = time.perf_counter() - self.t0
        for r in self.results:
            r.tokens, r.wall_s = _finish(r.tokens, self.max_new, self.eos), wall
        return self.results


def _unbatch(single: bool, results: list[Generation]) -> Generation | list[Generation]:
    return results[0] if single else results


@torch.no_grad()
def generate(model: LayerSkipLlama, prompts, max_new_tokens: int, eos_id: int | None = None,
             sampling: Sampling | None = None) -> Generation | list[Generation]:
    """Ordinary decoding with the full model and a KV cache, greedy or sampled (`sampling`); each
    row stops after `eos_id`. `prompts`: one prompt (a list of ids or a 1-D tensor) -> one
    Generation, or a list of prompts (any lengths) -> a list."""
    single = _single(prompts)
    batch = _Batch(model, [prompts] if single else prompts, max_new_tokens, sampling, eos_id)
    while batch.active:
        h = batch.engine.forward_cached(batch.last_tokens(), batch.positions())
        new = _pick(batch.engine.logits_at_exit(h[:, -1]), batch.sampling, batch.gen).tolist()
        for i, t in zip(batch.active, new):
            batch.results[i].tokens.append(t)
            batch.results[i].verify_passes += 1
        batch.step_done()
    return _unbatch(single, batch.finish())


def greedy_generate(model: LayerSkipLlama, prompts, max_new_tokens: int,
                    eos_id: int | None = None) -> Generation | list[Generation]:
    """Ordinary greedy decoding (`generate` without sampling)."""
    return generate(model, prompts, max_new_tokens, eos_id)


@torch.no_grad()
def self_speculative_generate(model: LayerSkipLlama, prompts, max_new_tokens: int, exit_layer: int,
                              draft_len: int, eos_id: int | None = None,
                              sampling: Sampling | None = None) -> Generation | list[Generation]:
    """Self-speculative decoding: draft `draft_len` tokens a round with the first `exit_layer`
    blocks (E, 1 <= E < L), verify them with blocks E..L-1 in one pass. Greedy: the same tokens as
    `generate`; sampled: the same distribution. `prompts` as in `generate`."""
    L, E = model.n_layers, exit_layer
    if not 1 <= E < L:
        raise ValueError(f"exit_layer must be in [1, {L - 1}] for a {L}-block model, got {E}")
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    single = _single(prompts)
    batch = _Batch(model, [prompts] if single else prompts, max_new_tokens, sampling, eos_id)
    engine, sampling, gen = batch.engine, batch.sampling, batch.gen

    # Invariant: row b has cached positions 0..p_b-1 in every block; its last token sits at p_b.
    while batch.active:
        p = batch.positions()
        # Never draft past any row's last token: positions stay within the cache and the context.
        budget = min([draft_len] + [batch.max_new - len(batch.results[i].tokens) - 1 for i in batch.active])
        token = batch.last_tokens()
        drafts, draft_probs, exits = [], [], []
        for j in range(budget + 1):
            # The last drafted token (or, with budget 0, the last accepted one) only needs its exit
            # hidden state: the verifier's input at that position.
            exits.append(engine.forward_cached(token, [x + j for x in p], (0, E)))
            if j == budget:
                break
            logits = engine.logits_at_exit(exits[-1][:, -1])
            if sampling.greedy:
                token = logits.argmax(-1, keepdim=True)
            else:
                draft_probs.append(sampling.probs(logits))
                token = _draw(draft_probs[-1], gen).unsqueeze(-1)
            drafts.append(token)
        h = engine.forward_cached(torch.cat(exits, dim=1), p, (E, L))
        full_logits = engine.logits_at_exit(h)  # [B, budget + 1, V]: the token after each input
        drafted = torch.cat(drafts, dim=1) if drafts else token.new_zeros(len(p), 0)
        if sampling.greedy:
            full = full_logits.argmax(-1)
            accept = drafted == full[:, :budget]
            n_ok = accept.cumprod(-1).sum(-1)
            nxt = full.gather(1, n_ok[:, None]).squeeze(1)
        else:
            target = sampling.probs(full_logits)  # p at every position
            if budget:
                q = torch.stack(draft_probs, dim=1)  # [B, budget, V]
                p_x = target[:, :budget].gather(-1, drafted[..., None]).squeeze(-1)
                q_x = q.gather(-1, drafted[..., None]).squeeze(-1)
                u = torch.rand(p_x.shape, generator=gen, device=p_x.device)
                accept = u * q_x < p_x  # u < p(x)/q(x), with q(x) > 0 since x was drawn from q
                n_ok = accept.long().cumprod(-1).sum(-1)
                q = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # all accepted: residual = p
            else:
                n_ok = torch.zeros(len(p), dtype=torch.long, device=target.device)
                q = torch.zeros_like(target)
            index = n_ok[:, None, None].expand(-1, 1, target.shape[-1])
            p_k, q_k = target.gather(1, index).squeeze(1), q.gather(1, index).squeeze(1)
            residual = (p_k - q_k).clamp_min(0)
            mass = residual.sum(-1, keepdim=True)
            # A rejection has residual mass > 0; guard rounding (p == q) by falling back to p.
            residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_k)
            nxt = _draw(residual, gen)
        n_ok_list, drafted_list, nxt_list = n_ok.tolist(), drafted.tolist(), nxt.tolist()
        for row, i in enumerate(batch.active):
            k, r = n_ok_list[row], batch.results[i]
            r.tokens += drafted_list[row][:k] + [nxt_list[row]]
            r.drafted += budget
            r.accepted += k
            r.verify_passes += 1
            r.rounds.append(k)
        engine.truncate([x + k + 1 for x, k in zip(p, n_ok_list)])  # rejected drafts' keys/values go
        batch.step_done()
    return _unbatch(single, batch.finish())
