"""Process-group plumbing: one-process groups, metric means, gradient clipping, and timeouts that
turn a missing peer into an exception instead of a hang."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from parallel.distributed import all_reduce_mean, clip_grad_norm_, destroy, init_distributed
from tests.parallel._mp import run_distributed


def test_single_process_gets_a_one_rank_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    try:
        assert init_distributed(timeout_s=10, device_type="cpu") == (0, 1, 0, torch.device("cpu"))
        assert init_distributed(timeout_s=10, device_type="cpu")[:2] == (0, 1)  # idempotent
        assert all_reduce_mean({"loss": 2.5}) == {"loss": 2.5}
    finally:
        destroy()
    assert not dist.is_initialized()


def test_clip_grad_norm_on_plain_tensors_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]
    for p in ours:
        p.grad = torch.randn(p.shape, generator=g)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for r, p in zip(ref, ours):
        r.grad = p.grad.clone()
    expected = float(torch.nn.utils.clip_grad_norm_(ref, 1.0))
    assert expected > 1.0  # clipping is active
    assert float(clip_grad_norm_(ours, 1.0)) == pytest.approx(expected, rel=1e-6)
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.grad, r.grad)


def _mean_worker(rank: int, world: int) -> dict[str, float]:
    # Insertion order differs between ranks on purpose: keys are matched by name.
    values = {"a": float(rank), "b": 2.0 * rank + 1} if rank == 0 else {"b": 2.0 * rank + 1, "a": float(rank)}
    return all_reduce_mean(values)


def test_all_reduce_mean() -> None:
    for out in run_distributed(_mean_worker, 2, timeout_s=60):
        assert out == {"a": 0.5, "b": 2.0}


def _missing_peer_worker(rank: int, world: int, timeout_s: float) -> tuple[str, float] | None:
    init_distributed(timeout_s, device_type="cpu")
    if rank == 1:
        # Alive and connected, but never joins the collective. (Exiting would close the
        # connection, and rank 0 would fail for that reason instead of the timeout.)
        time.sleep(3 * timeout_s)
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as e:  # gloo: RuntimeError("... Timed out waiting 3000ms ...")
        return str(e), time.monotonic() - start
    return "completed", time.monotonic() - start


def test_collective_with_missing_peer_times_out() -> None:
    message, elapsed = run_distributed(_missing_peer_worker, 2, args=(3.0,), timeout_s=60,
                                       pg_timeout_s=None)[0]
    assert "timed out" in message.lower(), message
    assert 2.5 <= elapsed < 6.0, f"raised after {elapsed:.1f} s with a 3 s timeout"
