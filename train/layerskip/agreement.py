"""Exit agreement: the share of tokens whose top-1 prediction at an exit equals the final layer's.

It is the cheap in-training proxy for self-speculative acceptance: a draft of the first E blocks
is accepted exactly while its greedy token equals the full model's. Like the exit loss, it never
holds more than one chunk of one exit's logits: token chunk by token chunk, the final layer's
top-1 is computed once and each exit's top-1 compared with it.

Under tensor parallelism the hidden states hold S / tp positions per rank and the head gathers the
sequence (and shards the vocabulary); the argmax of the vocabulary-sharded logits is then taken by
DTensor. Every TP rank counts the same tokens, so the shares need no reduction over TP.
"""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()  # type: ignore[assignment,misc]


def _top1(model, h: torch.Tensor) -> torch.Tensor:
    logits = model.unembed(h)
    top = logits.argmax(dim=-1)
    return top.full_tensor() if isinstance(top, DTensor) else top


@torch.no_grad()
def exit_agreement(model, h_last: torch.Tensor, hidden: dict[int, torch.Tensor],
                   chunk_tokens: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({exit layer: number of tokens whose top-1 equals the final layer's}, number of tokens),
    as device tensors (reading them is the only sync). `hidden` holds the captured exits' states
    [B, S_local, D] (as the model's forward captures them); the final layer is added with count =
    all tokens. Each chunk covers about `chunk_tokens` tokens of the local batch."""
    batch, local_seq = h_last.shape[:2]
    step = max(1, chunk_tokens // batch)
    last = model.n_layers - 1
    if not hidden:  # the final layer alone agrees with itself: no logits needed
        total = torch.tensor(batch * local_seq, device=h_last.device)
        return {last: total.clone()}, total
    counts = {l: torch.zeros((), dtype=torch.long, device=h_last.device) for l in sorted(hidden)}
    total = torch.zeros((), dtype=torch.long, device=h_last.device)
    for a in range(0, local_seq, step):
        b = min(a + step, local_seq)
        final = _top1(model, h_last[:, a:b])
        total += final.numel()
        for l in counts:
            counts[l] += (_top1(model, hidden[l][:, a:b]) == final).sum()
    counts[last] = total.clone()
    return counts, total


def with_agreement(loss_fn, chunk_tokens: int):
    """Wrap an exit loss fn (`make_exit_loss`) so that the model's forward also returns the exit
    agreement: fn(model, h_last, hidden) -> (ExitLoss, {layer: agreeing tokens}, tokens). It runs
    inside the model's root forward, like the loss, so FSDP2 has the head's weights gathered."""
    def fn(model, h_last: torch.Tensor, hidden: dict[int, torch.Tensor]):
        counts, total = exit_agreement(model, h_last, hidden, chunk_tokens)
        return loss_fn(model, h_last, hidden), counts, total
    return fn
