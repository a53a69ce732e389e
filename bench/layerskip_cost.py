"""What LayerSkip costs and saves per training step (forward + backward, no optimizer).

Cases, all on the same model, weights and batch:
- base: no LayerSkip (full logits, plain cross-entropy, as torchtitan does);
- drop_p{0.1,0.2,0.5}: per-sample layer dropout (depth exp, S(t) = 1, balanced), subset compute.
  Reported: realised fraction of sample-blocks skipped, the ideal saving (skipped fraction x the
  blocks' share of model FLOPs), the measured saving and realised / ideal (target >= 80 %);
- final_fused: the final layer's loss through the fused chunked exit loss, no early exits: the
  reference the exit cases are measured against (same loss path, only the exits differ);
- exit_rot4 / exit_all: early exits E = 1..L-1 (blocks run), rotational R=4 / all at every step, uniform
  weights (so every exit does the full three-GEMM work), fused chunked loss. Reported: time per
  exit against the three-GEMM floor measured on the same device, and peak memory vs base
  (target <= 1.05x).

Method. The cases run interleaved, round by round (base, drop_p0.1, ..., exit_all, base, ...), in
one process, so slow drifts of a shared machine hit every case alike. Step t of a case uses
dropout decisions / curriculum position t (the round), so rotational exits cycle through R.
- Time: on CUDA, wall time between synchronisations (bf16 weights). On CPU, the process's CPU time
  with one intra-op thread (fp32): it stays meaningful on an oversubscribed machine, where wall
  time does not (wall time is recorded too). Tables show the median; derived columns use means
  (the exit count varies per step under a curriculum).
- Peak memory of a step, above what was allocated before it: on CUDA from
  torch.cuda.max_memory_allocated. On CPU (no allocator statistics) from the kernel: the resident
  set's high-water mark is reset before the step (echo 5 > /proc/self/clear_refs) and VmHWM minus
  the resident set before the step is read after it; glibc is told to give every block of
  >= 128 KiB its own mapping, returned to the OS when freed, so freed memory is not silently
  reused. Where the reset is not permitted, no CPU peak is reported.

    python bench/layerskip_cost.py --out bench/results/layerskip_cost.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import DropoutConfig, ExitConfig, ModelConfig  # noqa: E402
from train.layerskip import ExitCurriculum, LayerDropout, make_exit_loss  # noqa: E402
from train.model import LayerSkipLlama, build_model, flops_per_token, init_model  # noqa: E402

PRESETS = {
    # Small but not tiny: a CPU run (one thread) takes a few minutes.
    "cpu": dict(model=ModelConfig(name="bench-cpu", dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
                                  vocab_size=16384, multiple_of=64, max_seq_len=256),
                batch=4, seq=128, chunk=256, rounds=6, warmup=1),
    # The GPU suite's dry run (bench/gpu_suite.sh --dry-run): every case in a second, no figures.
    "tiny": dict(model=ModelConfig(name="bench-tiny", dim=64, n_layers=4, n_heads=4, n_kv_heads=2,
                                   vocab_size=512, multiple_of=16, max_seq_len=64),
                 batch=2, seq=32, chunk=32, rounds=1, warmup=0),
    # Llama-3.2-1B shapes and batch, as bench/titan_baseline/ and bench/gpu_suite.sh measure them.
    "anchor": dict(model=ModelConfig(name="llama3.2-1b", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                     vocab_size=128256, multiple_of=256, ffn_dim_multiplier=1.5,
                                     rope_theta=500000.0, max_seq_len=2048),
                   batch=8, seq=2048, chunk=4096, rounds=12, warmup=2),
}


@dataclass
class Case:
    name: str
    p_max: float = 0.0
    exits: str | None = None  # None: plain loss; "": fused loss, final layer only; else ExitConfig.exits (E)
    curriculum: str = "fixed"
    period: int = 4


CASES = [
    Case("base"),
    Case("drop_p0.1", p_max=0.1),
    Case("drop_p0.2", p_max=0.2),
    Case("drop_p0.5", p_max=0.5),
    Case("final_fused", exits=""),
    Case("exit_rot4", exits="1:", curriculum="rotational", period=4),
    Case("exit_all", exits="1:", curriculum="fixed"),
]


# ------------------------------------------------------------------------------------ memory

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _return_freed_memory_to_the_os() -> None:
    """A fixed mmap threshold (which also stops glibc raising it dynamically) makes every block of
    128 KiB or more its own mapping, unmapped when freed; trimming releases what is cached."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMeter:
    """Peak bytes a piece of work adds above what is allocated before it (see module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ok = True
        if not self.cuda:
            _return_freed_memory_to_the_os()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.ok = False

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        elif self.ok:
            _return_freed_memory_to_the_os()
            Path("/proc/self/clear_refs").write_text("5")
            self.before = _status_kib("VmRSS") * 1024

    def peak(self) -> float:
        if self.cuda:
            return float(torch.cuda.max_memory_allocated() - self.before)
        return float(_status_kib("VmHWM") * 1024 - self.before) if self.ok else float("nan")


# ------------------------------------------------------------------------------------- cases

def make_step(case: Case, model: LayerSkipLlama, inputs: torch.Tensor, labels: torch.Tensor,
              chunk: int, total_steps: int) -> Callable[[int], tuple[float, int]]:
    """step(t) -> (fraction of sample-blocks skipped, early exits used): one forward + backward."""
    n_layers, batch, device = model.n_layers, inputs.shape[0], inputs.device
    drop = LayerDropout(DropoutConfig(p_max=case.p_max), n_layers, total_steps, seed=0) if case.p_max else None
    curriculum = None
    if case.exits:
        curriculum = ExitCurriculum(ExitConfig(exits=case.exits, curriculum=case.curriculum, period=case.period,
                                               weighting="uniform", chunk_tokens=chunk), n_layers, total_steps)

    def step(t: int) -> tuple[float, int]:
        keep, skipped = None, 0.0
        if drop is not None:
            plan = drop.plan(t, 0, batch, device)
            keep, skipped = plan.keep, plan.saved_fraction
        capture: list[int] = []
        if case.exits is None:
            logits = model(inputs, keep=keep)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        else:
            weights = {n_layers - 1: 1.0}
            if curriculum is not None:
                weights, capture = curriculum.weights(t), curriculum.capture(t)
            loss = model(inputs, keep=keep, capture=capture, loss_fn=make_exit_loss(labels, weights, chunk)).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return skipped, len(capture)

    return step


def make_floor(model_cfg: ModelConfig, tokens: int, device: torch.device,
               dtype: torch.dtype) -> Callable[[], None]:
    """One exit's unavoidable work: logits x @ W^T, grad_x = g @ W, grad_W = g^T @ x."""
    x = torch.randn(tokens, model_cfg.dim, device=device, dtype=dtype)
    w = torch.randn(model_cfg.vocab_size, model_cfg.dim, device=device, dtype=dtype)
    g = torch.randn(tokens, model_cfg.vocab_size, device=device, dtype=dtype)

    def floor() -> None:
        x @ w.t(), g @ w, g.t() @ x
    return floor


def run(preset: dict, cases: list[Case], device: torch.device,
        dtype: torch.dtype) -> tuple[dict[str, dict], float]:
    """Per-case results, and the mean time of one exit's three GEMMs (ms)."""
    cfg: ModelConfig = preset["model"]
    batch, seq, chunk = preset["batch"], preset["seq"], preset["chunk"]
    model = init_model(build_model(cfg, device), device, seed=0)
    for p in model.parameters():  # not model.to(dtype): that would cast the complex RoPE buffer
        p.data = p.data.to(dtype)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    total = preset["warmup"] + preset["rounds"]
    steps = {c.name: make_step(c, model, inputs, labels, chunk, total) for c in cases}
    floor = make_floor(cfg, batch * seq, device, dtype)  # timed every round, like the cases
    floor_times = []
    meter = PeakMeter(device)
    rec = {c.name: {"time": [], "wall": [], "skipped": [], "exits": [], "peak": []} for c in cases}
    for t in range(total):
        if device.type == "cuda":
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        floor()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if t >= preset["warmup"]:
            floor_times.append(time.perf_counter() - w0 if device.type == "cuda" else time.process_time() - c0)
        for c in cases:
            meter.start()
            w0, c0 = time.perf_counter(), time.process_time()
            skipped, exits = steps[c.name](t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if t < preset["warmup"]:
                continue
            r = rec[c.name]
            r["time"].append(wall if device.type == "cuda" else cpu)
            r["wall"].append(wall)
            r["skipped"].append(skipped)
            r["exits"].append(exits)
            r["peak"].append(meter.peak())
        if t >= preset["warmup"]:
            print(f"round {t - preset['warmup'] + 1}/{preset['rounds']}: "
                  + ", ".join(f"{n} {1000 * r['time'][-1]:.0f} ms" for n, r in rec.items()),
                  file=sys.stderr, flush=True)
    results = {name: {"median_ms": 1000 * statistics.median(r["time"]), "mean_ms": 1000 * statistics.fmean(r["time"]),
                      "wall_median_ms": 1000 * statistics.median(r["wall"]),
                      "skipped_fraction": statistics.fmean(r["skipped"]),
                      "exits_per_step": statistics.fmean(r["exits"]),
                      "peak_mib": max(r["peak"]) / 2**20, "times_ms": [1000 * x for x in r["time"]]}
               for name, r in rec.items()}
    return results, 1000 * statistics.fmean(floor_times)


def analyse(results: dict[str, dict], cfg: ModelConfig, seq: int, floor_ms: float) -> dict:
    """Add the derived columns in place; return the shared figures."""
    _, total, per_block = flops_per_token(cfg, build_model(cfg, "meta"), seq)
    block_share = cfg.n_layers * per_block / total
    base, ref = results["base"], results["final_fused"]
    for name, r in results.items():
        r["vs_base"] = r["mean_ms"] / base["mean_ms"]
        r["peak_vs_base"] = r["peak_mib"] / base["peak_mib"]
        if name.startswith("drop_"):
            r["ideal_saving"] = r["skipped_fraction"] * block_share
            r["realised_saving"] = 1 - r["mean_ms"] / base["mean_ms"]
            r["realised_over_ideal"] = r["realised_saving"] / r["ideal_saving"] if r["ideal_saving"] else float("nan")
        if name.startswith("exit_"):
            r["ms_per_exit"] = (r["mean_ms"] - ref["mean_ms"]) / r["exits_per_step"]
            r["per_exit_over_floor"] = r["ms_per_exit"] / floor_ms
            r["peak_vs_final_fused"] = r["peak_mib"] / ref["peak_mib"]
    return {"block_flop_share": block_share, "three_gemm_floor_ms": floor_ms}


def table(results: dict[str, dict]) -> str:
    def f(r: dict, k: str, fmt: str) -> str:
        return format(r[k], fmt) if k in r else ""
    rows = ["| case | step ms (median) | mean vs base | skipped | ideal saving | realised saving | realised/ideal "
            "| exits/step | ms per exit | per exit / 3-GEMM floor | peak MiB | peak vs base | peak vs final_fused |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        drop, ex = name.startswith("drop_"), name.startswith("exit_")
        rows.append(f"| {name} | {r['median_ms']:.0f} | {r['vs_base']:.3f} | "
                    f"{f(r, 'skipped_fraction', '.3f') if drop else ''} | {f(r, 'ideal_saving', '.1%')} | "
                    f"{f(r, 'realised_saving', '.1%')} | {f(r, 'realised_over_ideal', '.0%')} | "
                    f"{f(r, 'exits_per_step', '.2f') if ex else ''} | {f(r, 'ms_per_exit', '.0f')} | "
                    f"{f(r, 'per_exit_over_floor', '.2f')} | {r['peak_mib']:.0f} | {r['peak_vs_base']:.3f} | "
                    f"{f(r, 'peak_vs_final_fused', '.3f')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: anchor on CUDA, cpu otherwise")
    ap.add_argument("--rounds", type=int, help="timed rounds (one step of every case each)")
    ap.add_argument("--warmup", type=int, help="untimed rounds first")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--chunk", type=int, help="tokens per chunk of exit logits")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (CPU time is measured)")
    ap.add_argument("--cases", help="comma-separated subset of: " + ",".join(c.name for c in CASES))
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = dict(PRESETS[args.preset or ("anchor" if cuda else "cpu")])
    for k in ("rounds", "warmup", "batch", "seq", "chunk"):
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    cfg = replace(preset["model"], max_seq_len=max(preset["model"].max_seq_len, preset["seq"]))
    preset["model"] = cfg
    if not cuda:
        torch.set_num_threads(args.threads)
    wanted = set(args.cases.split(",")) if args.cases else {c.name for c in CASES}
    wanted |= {"base", "final_fused"}  # the references of every derived column
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}")
    cases = [c for c in CASES if c.name in wanted]

    results, floor = run(preset, cases, device, dtype)
    shared = analyse(results, cfg, preset["seq"], floor)

    device_name = torch.cuda.get_device_name(0) if cuda else f"cpu, {args.threads} thread(s), CPU time"
    print(f"device: {device_name}; torch {torch.__version__}, {dtype}; model dim {cfg.dim}, {cfg.n_layers} layers, "
          f"vocab {cfg.vocab_size}; batch {preset['batch']} x seq {preset['seq']}; exit chunk {preset['chunk']} "
          f"tokens; {preset['rounds']} timed rounds after {preset['warmup']}; blocks' FLOP share "
          f"{shared['block_flop_share']:.1%}; 3-GEMM floor per exit {floor:.0f} ms\n")
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": device_name, "torch": torch.__version__, "dtype": str(dtype), "model": asdict(cfg),
                **{k: v for k, v in preset.items() if k != "model"}, **shared}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
