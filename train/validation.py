"""Validation: the held-out loss (and perplexity) of every exit, as the training loop logs it.

`evaluate` is the per-exit computation (one place: the chosen exits E, `eval.at_exits`, and the
full model E = L over the held-out batches, averaged over the data-parallel ranks); `validate` runs it at the
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
from train.metrics import MetricsLogger, exit_key
from train.run_state import Run


def loss_context(tp: int):
    """Under tensor parallelism the head's logits are DTensors sharded over the vocabulary; the
    exit loss's cross-entropy on them needs loss_parallel(), around forward AND backward."""
    return loss_parallel() if tp > 1 else nullcontext()


@torch.no_grad()
def evaluate(model, batches, exits: list[int], chunk_tokens: int, tp: int, dp_group) -> dict[str, float]:
    """Mean loss (and perplexity) of each of `exits`' exits E (blocks run, 1..L; the full model
    E = L is always added) over the held-out batches and, when there is an early exit, each
    exit's top-1 agreement with the full model: `val/loss/exit_EE`, `val/ppl/exit_EE`,
    `val/agree/exit_EE`, and `val/loss/final`. Loss and agreement come from the same chunked pass
    over each exit's logits (train/layerskip/agreement.py)."""
    was_training = model.training
    model.eval()
    L = model.n_layers
    exits = sorted(set(exits) | {L})
    blocks = [e - 1 for e in exits]  # the model captures the output of block l = E - 1
    early = blocks[:-1]
    sums = torch.zeros(2 * len(exits) + 1, dtype=torch.float64)  # mean losses, agreeing tokens, tokens
    for inputs, labels in batches:
        with loss_context(tp):
            out = model(inputs, capture=early, loss_fn=scores_fn(labels, chunk_tokens, tp_degree=tp))
        valid = out.valid.clamp_min(1).double()
        sums += torch.stack([out.loss_sum[l].double() / valid for l in blocks]
                            + [out.agree[l].double() for l in blocks] + [out.tokens.double()]).cpu()
    local = {str(e): float(s) / len(batches) for e, s in zip(exits, sums)}
    local.update({f"agree/{e}": float(a / sums[-1]) for e, a in zip(exits, sums[len(exits):-1])})
    means = all_reduce_mean(local, dp_group)  # every DP rank counts the same number of tokens
    model.train(was_training)
    result = {}
    for e in exits:
        loss = means[str(e)]
        result[exit_key("val/loss", e)] = loss
        result[exit_key("val/ppl", e)] = math.exp(min(loss, 50.0))
        if early:
            result[exit_key("val/agree", e)] = means[f"agree/{e}"]
    result["val/loss/final"] = means[str(L)]
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
        vals = evaluate(r.model, checked(val_batches), r.cfg.eval.exit_list(r.n_layers), chunk, r.dims.tp,
                        r.dp_group)
        for name, batches in (source_val or {}).items():
            vals[f"val/loss/source/{name}"] = evaluate(r.model, checked(batches), [], chunk, r.dims.tp,
                                                       r.dp_group)["val/loss/final"]
    except _Interrupted:
        r.model.train()
        return None
    if r.is_main:
        exits = range(1, r.n_layers + 1)  # E = blocks run, as in the metric names
        shown = " ".join(f"E{e}={vals[exit_key('val/loss', e)]:.3f}" for e in exits if exit_key("val/loss", e) in vals)
        agree = " ".join(f"E{e}={vals[exit_key('val/agree', e)]:.2f}"
                         for e in exits[:-1] if exit_key("val/agree", e) in vals)
        metrics.log(r.state.step, vals,
                    console=f"step {r.state.step:>6} | val loss {vals['val/loss/final']:.4f} | {shown}"
                            + (f" | top-1 agreement {agree}" if agree else ""))
    return vals


def validation_due(cfg: Config, step: int, last: bool) -> bool:
    every = cfg.eval.every
    return bool(every and (step % every == 0 or last) or (last and every == 0))
