"""Validation of exits in one pass: each exit's held-out loss and its top-1 agreement with the
final layer, from the same logits.

Agreement is the cheap in-training proxy for self-speculative acceptance: a draft of the first E
blocks is accepted exactly while its greedy token equals the full model's. Validation's cost is
the head: one [tokens, dim] x [dim, vocab] product per exit, which on a real vocabulary (49k,
128k) outweighs the blocks' forward. So each exit's logits are computed once, token chunk by token
chunk, and give both its cross-entropy and its top-1 (the final layer's first, kept per chunk as
the reference); never more than one chunk of one exit's logits is alive.

On plain tensors the cross-entropy and the top-1 share the passes over the chunk: one max (value
and index at once), one in-place exp, one sum. Under tensor parallelism the hidden states hold
S / tp positions per rank and the head gathers the sequence and shards the vocabulary: logits are
DTensors, their cross-entropy runs under `loss_parallel()` (entered by the caller, as for the exit
loss) and their argmax is taken by DTensor. Every TP rank then counts the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()  # type: ignore[assignment,misc]


@dataclass
class ExitScores:
    """Sums over one batch, as device tensors (reading them is the only sync), keyed by the block
    index l = E - 1 of exit E, as the model captures them: `loss_sum[l]`, the summed
    cross-entropy of exit E = l + 1 over the valid tokens; `agree[l]`, the tokens whose top-1
    equals the final layer's (all of them for the final layer); `valid`, tokens with a label;
    `tokens`, all tokens."""
    loss_sum: dict[int, torch.Tensor]
    agree: dict[int, torch.Tensor]
    valid: torch.Tensor
    tokens: torch.Tensor


def _plain_chunk(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE over the valid tokens, top-1 ids) of normed states x [c, D]: one GEMM and three
    passes over the [c, V] logits."""
    logits = (x @ weight.t()).float()
    target = logits.gather(1, labels[:, None]).squeeze(1)
    top, top1 = logits.max(dim=1)
    total = logits.sub_(top[:, None]).exp_().sum(dim=1)
    return ((top + total.log() - target) * valid).sum(), top1


def _sharded_chunk(model, h: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model.unembed(h).float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=ignore_index)
    top1 = logits.argmax(dim=-1)
    return (loss.to_local() if isinstance(loss, DTensor) else loss,
            top1.full_tensor() if isinstance(top1, DTensor) else top1)


@torch.no_grad()
def exit_scores(model, h_last: torch.Tensor, hidden: dict[int, torch.Tensor], labels: torch.Tensor,
                chunk_tokens: int, *, tp_degree: int = 1, ignore_index: int = -100) -> ExitScores:
    """Loss sums and agreement counts of the final layer (h_last) and of every captured exit
    (`hidden`: {layer: [B, S_local, D]}, as the model's forward captures them) on one batch with
    `labels` [B, S] (the full sequence, also under TP). Each chunk covers about `chunk_tokens`
    tokens of the local batch."""
    batch, local_seq = h_last.shape[:2]
    last = model.n_layers - 1
    exits = sorted(hidden)
    losses = {l: torch.zeros((), dtype=torch.float32, device=h_last.device) for l in [*exits, last]}
    agree = {l: torch.zeros((), dtype=torch.long, device=h_last.device) for l in exits}
    weight = model.output.weight
    if not isinstance(weight, DTensor) and tp_degree == 1:
        flat_labels = labels.reshape(-1)
        valid = (flat_labels != ignore_index).to(torch.float32)
        safe = flat_labels.masked_fill(flat_labels == ignore_index, 0)
        states = {l: hidden[l].reshape(-1, h_last.shape[-1]) for l in exits}
        states[last] = h_last.reshape(-1, h_last.shape[-1])
        n = safe.numel()
        for a in range(0, n, chunk_tokens):
            b = min(a + chunk_tokens, n)
            loss, final = _plain_chunk(model.norm(states[last][a:b]), weight, safe[a:b], valid[a:b])
            losses[last] += loss
            for l in exits:
                loss, top1 = _plain_chunk(model.norm(states[l][a:b]), weight, safe[a:b], valid[a:b])
                losses[l] += loss
                agree[l] += (top1 == final).sum()
    else:
        # The head gathers the sequence over TP ranks: chunk [a:b] of the local sequence becomes
        # [rank 0's a:b, rank 1's a:b, ...], so its labels are these columns of each rank's slice.
        by_rank = labels.view(batch, tp_degree, local_seq)
        step = max(1, chunk_tokens // (batch * tp_degree))
        for a in range(0, local_seq, step):
            b = min(a + step, local_seq)
            y = by_rank[:, :, a:b].reshape(batch, -1)
            loss, final = _sharded_chunk(model, h_last[:, a:b], y, ignore_index)
            losses[last] += loss
            for l in exits:
                loss, top1 = _sharded_chunk(model, hidden[l][:, a:b], y, ignore_index)
                losses[l] += loss
                agree[l] += (top1 == final).sum()
    tokens = torch.tensor(labels.numel(), device=h_last.device)
    agree[last] = tokens.clone()
    return ExitScores(loss_sum=losses, agree=agree, valid=(labels != ignore_index).sum(), tokens=tokens)


def scores_fn(labels: torch.Tensor, chunk_tokens: int, *, tp_degree: int = 1, ignore_index: int = -100):
    """`exit_scores` as a loss fn for `model(tokens, capture=[...], loss_fn=fn)`: it runs inside the
    model's root forward, like the exit loss, so FSDP2 has the head's weights gathered."""
    def fn(model, h_last: torch.Tensor, hidden: dict[int, torch.Tensor]) -> ExitScores:
        return exit_scores(model, h_last, hidden, labels, chunk_tokens, tp_degree=tp_degree,
                           ignore_index=ignore_index)
    return fn
