"""Validation: the held-out loss (and perplexity) of every exit, as the training loop logs it.

`evaluate` is the per-exit computation (one place: the chosen exits, `eval.exits`, and the final
layer over the held-out batches, averaged over the data-parallel ranks); `validate` runs it at the
current step for the run's held-out batches (and each mixture source's) and logs the result, or
stops between two batches when a preemption signal arrived (so the checkpoint is not delayed by a
whole validation); `validation_due` says when.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch.distributed.tensor.parallel import loss_parallel

from parallel.distributed import all_reduce_mean
from train.config import Config
from train.layerskip.agreement import scores_fn
from train.metrics import MetricsLogger
from train.run_state import Run


def loss_context(tp: int):
    """Under tensor parallelism the head's logits are DTensors sharded over the vocabulary; the
    exit loss's cross-entropy on them needs loss_parallel(), around forward AND backward."""
    return loss_parallel() if tp > 1 else nullcontext()


@torch.no_grad()
def evaluate(model, batches, layers: list[int], chunk_tokens: int, tp: int, dp_group) -> dict[str, float]:
    """Mean loss (and perplexity) of each of `layers`' exits (block indices; the final layer
    L - 1 is always added) over the held-out batches and, when there is an early exit, each
    exit's top-1 agreement with the final layer. Loss and agreement come from the same chunked
    pass over each exit's logits (train/layerskip/agreement.py)."""
    was_training = model.training
    model.eval()
    last = model.n_layers - 1
    layers = sorted(set(layers) | {last})
    exits = [l for l in layers if l != last]
    sums = torch.zeros(2 * len(layers) + 1, dtype=torch.float64)  # mean losses, agreeing tokens, tokens
    for inputs, labels in batches:
        with loss_context(tp):
            out = model(inputs, capture=exits, loss_fn=scores_fn(labels, chunk_tokens, tp_degree=tp))
        valid = out.valid.clamp_min(1).double()
        sums += torch.stack([out.loss_sum[l].double() / valid for l in layers]
                            + [out.agree[l].double() for l in layers] + [out.tokens.double()]).cpu()
    local = {str(l): float(s) / len(batches) for l, s in zip(layers, sums)}
    local.update({f"agree/{l}": float(a / sums[-1]) for l, a in zip(layers, sums[len(layers):-1])})
    means = all_reduce_mean(local, dp_group)  # every DP rank counts the same number of tokens
    model.train(was_training)
    result = {}
    for l in layers:
        loss = means[str(l)]
        result[f"val/loss/layer_{l:02d}"] = loss
        result[f"val/ppl/layer_{l:02d}"] = math.exp(min(loss, 50.0))
        if exits:
            result[f"val/agree/layer_{l:02d}"] = means[f"agree/{l}"]
    result["val/loss/final"] = means[str(last)]
    return result


class _Interrupted(Exception):
    """Some rank was signalled: validation stops before its next batch."""


class _StopBetweenBatches(list):
    """The held-out batches; before each one, every rank asks `stop()` together (a collective),
    so a preemption signal is noticed within one batch and every rank stops at the same batch."""

    def __init__(self, batches: list, stop):
        super().__init__(batches)
        self.stop = stop

    def __iter__(self):
        for batch in super().__iter__():
            if self.stop():
                raise _Interrupted
            yield batch


def validate(r: Run, val_batches: list, metrics: MetricsLogger,
             source_val: dict[str, list] | None = None) -> dict[str, float] | None:
    """Held-out loss of every exit (or the last layer only), and with a mixture each source's
    final-layer loss (`source_val`: name -> batches), logged at the current step. None (nothing
    logged) when a preemption signal interrupted it: the run saves and stops instead."""
    chunk = r.cfg.layerskip.exit.chunk_tokens

    def checked(batches: list) -> list:
        return _StopBetweenBatches(batches, r.any_rank_signalled)

    try:
        vals = evaluate(r.model, checked(val_batches), r.cfg.eval.layer_list(r.n_layers), chunk, r.dims.tp,
                        r.dp_group)
        for name, batches in (source_val or {}).items():
            vals[f"val/loss/source/{name}"] = evaluate(r.model, checked(batches), [], chunk, r.dims.tp,
                                                       r.dp_group)["val/loss/final"]
    except _Interrupted:
        r.model.train()
        return None
    if r.is_main:
        shown = " ".join(f"L{l}={vals[f'val/loss/layer_{l:02d}']:.3f}"
                         for l in range(r.n_layers) if f"val/loss/layer_{l:02d}" in vals)
        agree = " ".join(f"L{l}={vals[f'val/agree/layer_{l:02d}']:.2f}"
                         for l in range(r.n_layers - 1) if f"val/agree/layer_{l:02d}" in vals)
        metrics.log(r.state.step, vals,
                    console=f"step {r.state.step:>6} | val loss {vals['val/loss/final']:.4f} | {shown}"
                            + (f" | top-1 agreement {agree}" if agree else ""))
    return vals


def validation_due(cfg: Config, step: int, last: bool) -> bool:
    every = cfg.eval.every
    return bool(every and (step % every == 0 or last) or (last and every == 0))
