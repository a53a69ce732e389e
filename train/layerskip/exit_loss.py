"""The early-exit loss J = Σ_l w_l · CE(head(norm(h_l)), y), with bounded memory.

Every exit shares the model's final norm and output head, so one exit's logits are
tokens × vocab floats; with several exits (and Llama 3's 128k vocabulary) keeping them all alive
does not fit. Both implementations below keep at most one chunk of one exit's logits alive at any
time, in forward and in backward:

(a) fused (plain-tensor head weight W): one autograd.Function walks over the exits and, for each,
    applies the final norm, then for each token chunk computes logits, the CE and at once its
    gradients grad_x = g @ W and grad_W += g^T @ x, with g = (softmax - onehot) · w / N; the logits
    chunk is dropped right away. grad_x is pushed through the norm immediately. Only grad_h
    (tokens × dim per exit, the size of the activations a recomputing loss would save) and one
    grad_W and grad_norm_weight (shared by all exits) are kept; backward merely scales them. That is
    the three-GEMM lower bound per exit: no recompute.
(b) checkpointed chunks (DTensor head weight, i.e. tensor parallel, or when forced): each chunk's
    loss runs under torch.utils.checkpoint, so its logits are recomputed in backward, one chunk at a
    time. Works for any head module: here model.unembed is called, so torchtitan's TP plan
    (sequence-parallel norm, ColwiseParallel output with Shard(-1) logits) applies. Under TP the
    caller must run forward AND backward inside `torch.distributed.tensor.parallel.loss_parallel()`
    (as torchtitan's trainer does); it is not entered here because loss_parallel() contexts cannot
    nest (the inner exit would switch off the outer one).

The CE of every exit is a mean over the (non-ignored) tokens of the local batch. Exits with weight
0 (exit 0 under the paper weighting) are computed forward-only, for logging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()  # type: ignore[assignment,misc]


@dataclass
class ExitLoss:
    """What the loss fn returns: `loss` (weighted total, for backward) and `per_layer`
    ({exit layer: detached mean CE}; device tensors, so reading them is the only sync)."""
    loss: torch.Tensor
    per_layer: dict[int, torch.Tensor]


def _chunk_ce(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
              grad_scale: torch.Tensor | None, grad_w: torch.Tensor | None, want_grad_x: bool,
              chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over tokens of CE(x @ W^T, labels) for x [N, D], chunk by chunk. With `grad_scale` (a
    0-d tensor: w / N_valid) also returns grad_x [N, D] and accumulates grad_W into `grad_w` (fp32).
    `labels` has ignored positions replaced by 0; `valid` masks them out."""
    n = x.shape[0]
    loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if grad_scale is not None and want_grad_x else None
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        xc, yc, vc = x[a:b], labels[a:b, None], valid[a:b]
        logits = (xc @ weight.t()).float()  # [c, V]: the only large tensor, one chunk at a time
        target = logits.gather(1, yc).squeeze(1)
        # log-sum-exp and softmax in place, sharing one exp: few passes over the [c, V] chunk.
        top = logits.amax(dim=1)
        exp = logits.sub_(top[:, None]).exp_()
        total = exp.sum(dim=1)
        loss_sum = loss_sum + ((top + total.log() - target) * vc).sum()
        if grad_scale is None:
            continue
        row = vc * grad_scale  # d(loss)/d(CE of each token): w / N_valid, 0 where ignored
        g = exp.mul_((row / total)[:, None])  # softmax * row
        g.scatter_add_(1, yc, -row[:, None])  # minus the one-hot * row
        g = g.to(x.dtype)
        if grad_x is not None:
            torch.mm(g, weight, out=grad_x[a:b])
        if grad_w is not None:
            if grad_w.dtype == g.dtype:
                grad_w.addmm_(g.t(), xc)
            else:  # bf16 GEMM, fp32 accumulation across chunks
                grad_w.add_(g.t() @ xc)
        del logits, exp, g
    return loss_sum, grad_x


class _FusedExitCE(torch.autograd.Function):
    """forward(W, norm_weight, labels, valid, count, norm, weights, chunk, *hs) -> (total, per_layer)

    hs are the exits' hidden states (before the final norm). Exit by exit, in forward: apply the
    norm (under a local autograd graph), walk the token chunks (logits, CE, grad_x, grad_W), then
    push grad_x through the norm at once (torch.autograd.grad) to get grad_h and grad_norm_weight.
    So only one exit's normed states are alive at a time, and what is kept for backward is grad_h
    per exit plus one grad_W and one grad_norm_weight. Backward only scales those by the incoming
    gradient of `total`, in place (they are not needed afterwards)."""

    @staticmethod
    def forward(ctx, weight, norm_weight, labels, valid, count, norm, weights, chunk, *hs):
        need_w, need_nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_nw = torch.zeros(norm_weight.shape, dtype=torch.float32, device=norm_weight.device) if need_nw else None
        losses, grad_hs = [], []
        for h, w, need_h in zip(hs, weights, ctx.needs_input_grad[8:]):
            through_norm = w != 0 and (need_h or need_nw)
            with torch.enable_grad():
                h_in = h.detach().requires_grad_(need_h)
                x = norm(h_in).reshape(-1, weight.shape[1])
            scale = (w / count) if w != 0 and (need_w or through_norm) else None  # weight 0: forward only
            s, grad_x = _chunk_ce(x.detach(), weight, labels, valid, scale, grad_w, through_norm, chunk)
            losses.append(s / count)
            grad_h = None
            if grad_x is not None:
                wrt = ([h_in] if need_h else []) + ([norm_weight] if need_nw else [])
                grads = list(torch.autograd.grad(x, wrt, grad_x))
                grad_h = grads.pop(0) if need_h else None
                if need_nw:
                    grad_nw += grads.pop(0).float()
            del x, h_in, grad_x
            grad_hs.append(grad_h)
        per_layer = torch.stack(losses)
        total = sum(w * l for w, l in zip(weights, losses))
        ctx.has_grad_h = [g is not None for g in grad_hs]
        extra = [g.to(p.dtype) for g, p in ((grad_w, weight), (grad_nw, norm_weight)) if g is not None]
        ctx.has_grad_w, ctx.has_grad_nw = grad_w is not None, grad_nw is not None
        ctx.save_for_backward(*[g for g in grad_hs if g is not None], *extra)
        ctx.mark_non_differentiable(per_layer)
        ctx.used = False
        return total, per_layer

    @staticmethod
    def backward(ctx, grad_total, _grad_per_layer):
        if ctx.used:  # the saved gradients were scaled in place the first time
            raise RuntimeError("backward through the fused exit loss twice (retain_graph) is not supported")
        ctx.used = True
        saved = [t.mul_(grad_total) for t in ctx.saved_tensors]
        grad_nw = saved.pop() if ctx.has_grad_nw else None
        grad_w = saved.pop() if ctx.has_grad_w else None
        it = iter(saved)
        grad_hs = [next(it) if has else None for has in ctx.has_grad_h]
        return (grad_w, grad_nw, None, None, None, None, None, None, *grad_hs)


def _fused(model, states: dict[int, torch.Tensor], weights: dict[int, float], labels: torch.Tensor,
           ignore_index: int, chunk: int) -> ExitLoss:
    weight = model.output.weight
    norm_weight = getattr(model.norm, "weight", None)
    if norm_weight is None:  # a norm without a scale: nothing to train there
        norm_weight = torch.ones(weight.shape[1], device=weight.device, dtype=weight.dtype)
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    safe = flat.masked_fill(~valid, 0)
    count = valid.sum().clamp_min(1).to(torch.float32)
    valid = valid.to(torch.float32)
    layers = list(states)
    hs = [states[l] for l in layers]
    ws = tuple(float(weights.get(l, 0.0)) for l in layers)
    if torch.is_grad_enabled() and (weight.requires_grad or norm_weight.requires_grad
                                    or any(h.requires_grad for h in hs)):
        total, per_layer = _FusedExitCE.apply(weight, norm_weight, safe, valid, count, model.norm, ws, chunk, *hs)
    else:  # evaluation: forward only, one exit's normed states at a time
        per_layer = torch.stack([
            _chunk_ce(model.norm(h).reshape(-1, weight.shape[1]), weight, safe, valid, None, None, False, chunk)[0]
            / count for h in hs])
        total = (per_layer * torch.tensor(ws, device=per_layer.device)).sum()
    return ExitLoss(loss=total, per_layer={l: per_layer[i] for i, l in enumerate(layers)})


def _checkpointed(model, states: dict[int, torch.Tensor], weights: dict[int, float],
                  labels: torch.Tensor, ignore_index: int, chunk_tokens: int, tp_degree: int) -> ExitLoss:
    batch, seq = labels.shape
    count = (labels != ignore_index).sum().clamp_min(1).to(torch.float32)

    def chunk_loss(h_chunk: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model.unembed(h_chunk).float()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum", ignore_index=ignore_index)
        return loss.to_local() if isinstance(loss, DTensor) else loss  # replicated over TP

    total = torch.zeros((), dtype=torch.float32, device=labels.device)
    per_layer = {}
    for l, h in states.items():
        local_seq = h.shape[1]
        if local_seq * tp_degree != seq:
            raise ValueError(f"exit {l}: hidden states hold {local_seq} positions per tensor-parallel rank "
                             f"x tp_degree {tp_degree}, but labels have {seq}")
        w = float(weights.get(l, 0.0))
        # The head all-gathers the sequence over TP ranks: chunk [a:b] of the local sequence becomes
        # [rank 0's a:b, rank 1's a:b, ...], so its labels are these columns of each rank's slice.
        by_rank = labels.view(batch, tp_degree, local_seq)
        step = max(1, chunk_tokens // (batch * tp_degree))
        loss_sum = torch.zeros((), dtype=torch.float32, device=labels.device)
        for a in range(0, local_seq, step):
            b = min(a + step, local_seq)
            y = by_rank[:, :, a:b].reshape(batch, -1)
            if w != 0 and torch.is_grad_enabled():
                loss_sum = loss_sum + checkpoint(chunk_loss, h[:, a:b], y, use_reentrant=False)
            else:
                with torch.no_grad():
                    loss_sum = loss_sum + chunk_loss(h[:, a:b], y)
        mean = loss_sum / count
        per_layer[l] = mean.detach()
        total = total + w * mean
    return ExitLoss(loss=total, per_layer=per_layer)


def make_exit_loss(labels: torch.Tensor, weights: dict[int, float], chunk_tokens: int, *,
                   tp_degree: int = 1, ignore_index: int = -100,
                   impl: str = "auto") -> Callable[..., ExitLoss]:
    """A loss fn for `model(tokens, capture=[exits except L-1], loss_fn=fn)`.

    labels: [B, S] targets of the local batch (full sequence, also under TP). weights: {exit layer:
    weight}, usually `ExitCurriculum.weights(step)`; the last layer L-1 uses h_last (weight 0 if
    absent). chunk_tokens: tokens per chunk of logits. tp_degree: tensor-parallel degree (hidden
    states then hold S / tp positions per rank). impl: auto (fused unless the head weight is a
    DTensor) | fused | checkpoint. Returns fn(model, h_last, {l: h_l}) -> ExitLoss."""
    if chunk_tokens < 1:
        raise ValueError(f"layerskip.exit.chunk_tokens must be positive, got {chunk_tokens}")
    if impl not in ("auto", "fused", "checkpoint"):
        raise ValueError(f"impl must be auto|fused|checkpoint, got {impl!r}")
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    if tp_degree < 1:
        raise ValueError(f"tp_degree must be >= 1, got {tp_degree}")

    def loss_fn(model, h_last: torch.Tensor, hidden: dict[int, torch.Tensor]) -> ExitLoss:
        last = model.n_layers - 1
        missing = [l for l in weights if l != last and l not in hidden]
        if missing:
            raise ValueError(f"exit layers {missing} have weights but were not captured; "
                             f"call the model with capture={sorted(l for l in weights if l != last)}")
        extra = [l for l in hidden if l not in weights]
        if extra:
            raise ValueError(f"captured layers {extra} have no exit weight")
        states = {l: hidden[l] for l in sorted(hidden)}
        states[last] = h_last
        dtensor = isinstance(model.output.weight, DTensor)
        if impl == "fused" and dtensor:
            raise ValueError("the fused exit loss needs a plain-tensor head weight; it is a DTensor here "
                             "(tensor parallel, or an FSDP unit of its own): use impl='checkpoint' or 'auto'")
        if impl == "checkpoint" or dtensor or tp_degree > 1:
            return _checkpointed(model, states, weights, labels, ignore_index, chunk_tokens, tp_degree)
        return _fused(model, states, weights, labels, ignore_index, chunk_tokens)

    return loss_fn
