"""What document masking (model.attention=block_causal) costs per training step, against causal.

One training step as the trainer runs it (forward with the recipe's layer dropout and early-exit
loss, backward; no optimizer), on the same model, weights and batch, once with plain causal
attention and once block-causal; the two cases run interleaved, round by round, so drifts of a
shared machine hit both alike. Windows are packed synthetic documents (BOS ... EOS) whose lengths
are drawn from an exponential distribution of mean --doc-tokens (a web corpus' documents average
around a thousand tokens), so a window holds several documents, as at Llama 3's lengths.

Shapes (--shapes, comma-separated):
  quickstart   the quickstart recipe: its tiny model, seq 256, batch 4, its LayerSkip settings;
  seq2048      the same model and LayerSkip at seq 2048, batch 4;
  llama3_2_1b  the continual_llama3_2_1b recipe: Llama 3.2 1B, seq 4096, batch 4, its LayerSkip,
               selective AC and compiled blocks (GPU: FlexAttention against SDPA's causal kernel);
  tiny         a few milliseconds, for smoke tests (no figures).
Before timing, the mask is checked on the device: a tiny fp32 model's packed documents must equal
the documents computed alone, at every exit, under layer dropout (else the script stops).
Time: on CUDA, wall time between synchronisations (bf16 weights); on CPU, the process's CPU time
with one intra-op thread (fp32), which stays meaningful on a busy machine (wall time is recorded
too). On CPU the mask is dense ([B, 1, S, S] booleans into scaled_dot_product_attention), whose
cost does not fall with the number of documents; FlexAttention on CUDA skips the masked blocks.

    python bench/document_mask_cost.py --shapes quickstart,seq2048 --out bench/results/document_mask_cost_cpu.json
    python bench/document_mask_cost.py --shapes tiny --rounds 1 --warmup 0      # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.config import Config, load_config, register_schemas  # noqa: E402
from train.document_mask import DocumentBoundaries  # noqa: E402
from train.layerskip import ExitCurriculum, LayerDropout, make_exit_loss  # noqa: E402
from train.model import build_model, init_model  # noqa: E402

BOS, EOS = 1, 2  # ids of the synthetic documents (any two ids of the vocabulary)
MODES = ("causal", "block_causal")


@dataclass
class Shape:
    recipe: list[str]  # Hydra overrides of the recipe the shape comes from
    seq: int
    batch: int


SHAPES = {
    "quickstart": Shape(["experiment=quickstart"], 256, 4),
    "seq2048": Shape(["experiment=quickstart", "model.max_seq_len=2048"], 2048, 4),
    "llama3_2_1b": Shape(["experiment=continual_llama3_2_1b", "data.source=unused"], 4096, 4),
    "tiny": Shape(["experiment=quickstart", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
                   "model.n_kv_heads=2", "model.vocab_size=512", "model.multiple_of=16"], 64, 2),
}


def compose(overrides: list[str]) -> Config:
    from hydra import compose as hydra_compose, initialize_config_dir
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "recipes")):
        return load_config(hydra_compose("train", overrides=overrides))


def packed_windows(batch: int, seq: int, vocab: int, doc_tokens: float, seed: int = 0) -> tuple[torch.Tensor, float]:
    """[batch, seq + 1] ids of BOS ... EOS documents of exponential lengths (mean doc_tokens, at
    least 2), cut into windows; and the mean number of documents a window touches."""
    g = torch.Generator().manual_seed(seed)
    need, stream = batch * (seq + 1), []
    while len(stream) < need:
        n = max(2, int(torch.empty(1).exponential_(1.0 / doc_tokens, generator=g).item()))
        stream += [BOS] + torch.randint(3, vocab, (n - 2,), generator=g).tolist() + [EOS]
    tokens = torch.tensor(stream[:need]).view(batch, seq + 1)
    starts = ((tokens[:, 1:-1] == BOS) & (tokens[:, :-2] == EOS)).sum(dim=1) + 1
    return tokens, float(starts.float().mean())


def make_step(cfg: Config, mode: str, state: dict, inputs: torch.Tensor, labels: torch.Tensor,
              device: torch.device, dtype: torch.dtype, compiled: bool, total_steps: int):
    """step(t): one forward + backward of the recipe's LayerSkip step t, attention `mode`."""
    from parallel.parallelize import apply_ac, apply_compile
    docs = DocumentBoundaries(BOS, EOS) if mode == "block_causal" else None
    model = build_model(cfg.model, device, documents=docs)
    model.load_state_dict(state)
    for p in model.parameters():  # not model.to(dtype): that would cast the complex RoPE buffer
        p.data = p.data.to(dtype)
    if device.type == "cuda":  # the recipe's activation checkpointing and compile (parallel=gpu)
        apply_ac(model, cfg.parallel.ac)
        if compiled:
            apply_compile(model)
    L = cfg.model.n_layers
    dropout = LayerDropout(cfg.layerskip.dropout, L, total_steps, seed=cfg.train.seed)
    curriculum = ExitCurriculum(cfg.layerskip.exit, L, total_steps)

    def step(t: int) -> None:
        plan = dropout.plan(t, 0, inputs.shape[0], device)
        weights = curriculum.weights(t)
        fn = make_exit_loss(labels, weights, cfg.layerskip.exit.chunk_tokens)
        model(inputs, keep=plan.keep, capture=[l for l in weights if l != L - 1], loss_fn=fn).loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def measure(name: str, shape: Shape, rounds: int, warmup: int, doc_tokens: float, device: torch.device,
            dtype: torch.dtype, compiled: bool) -> dict:
    cfg = compose(shape.recipe + [f"data.seq_len={shape.seq}", f"data.batch_size={shape.batch}"])
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, shape.seq)
    state = init_model(build_model(replace(cfg.model, attention="causal"), "cpu"), "cpu", seed=0).state_dict()
    tokens, docs_per_window = packed_windows(shape.batch, shape.seq, cfg.model.vocab_size, doc_tokens)
    tokens = tokens.to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    total = warmup + rounds
    steps = {m: make_step(cfg, m, state, inputs, labels, device, dtype, compiled, total) for m in MODES}
    times = {m: {"time": [], "wall": []} for m in MODES}
    for t in range(total):
        for m in MODES:
            if device.type == "cuda":
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            steps[m](t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if t >= warmup:
                times[m]["time"].append(wall if device.type == "cuda" else cpu)
                times[m]["wall"].append(wall)
        if t >= warmup:
            print(f"{name} round {t - warmup + 1}/{rounds}: "
                  + ", ".join(f"{m} {1000 * times[m]['time'][-1]:.0f} ms" for m in MODES), file=sys.stderr, flush=True)
    out = {m: {"median_ms": 1000 * statistics.median(r["time"]), "wall_median_ms": 1000 * statistics.median(r["wall"]),
               "times_ms": [1000 * x for x in r["time"]]} for m, r in times.items()}
    ratio = out["block_causal"]["median_ms"] / out["causal"]["median_ms"]
    tokens_per_step = shape.batch * shape.seq
    return {"recipe": shape.recipe, "seq": shape.seq, "batch": shape.batch, "model": asdict(cfg.model),
            "layerskip": {"p_max": cfg.layerskip.dropout.p_max, "exits": cfg.layerskip.exit.exits,
                          "period": cfg.layerskip.exit.period},
            "docs_per_window": docs_per_window, **out, "masked_over_causal": ratio,
            "tokens_per_s": {m: tokens_per_step / (out[m]["median_ms"] / 1000) for m in MODES}}


def check_exactness(device: torch.device) -> dict:
    """Before timing: on this device, with the mask form the trainer uses here (FlexAttention on
    CUDA), a tiny fp32 model's packed documents equal the documents computed alone by the causal
    model, at every exit, under layer dropout (blocks kept on some rows only, one on none).
    Returns the largest difference; the caller stops when it is above 1e-3."""
    cfg = compose(SHAPES["tiny"].recipe + ["model.n_layers=4", "model.max_seq_len=256"]).model
    docs_cfg = DocumentBoundaries(BOS, EOS)
    state = init_model(build_model(replace(cfg, attention="causal"), "cpu"), "cpu", seed=0).state_dict()
    masked, causal = build_model(cfg, device, documents=docs_cfg), build_model(cfg, device)
    masked.load_state_dict(state)
    causal.load_state_dict(state)
    tokens, _ = packed_windows(2, 256, cfg.vocab_size, doc_tokens=60, seed=1)  # two 128-token blocks a row
    tokens = tokens[:, :-1].to(device)
    L = cfg.n_layers
    keep_rows = [None, [1], [], [0]]  # all rows; row 1 only; none (the block still runs); row 0
    keep = [None if k is None else torch.tensor(k, dtype=torch.long, device=device) for k in keep_rows]

    def exits(model, x, keep):
        def logits(m, h, hidden):
            return {l: m.unembed(v) for l, v in hidden.items()}
        return model(x, keep=keep, capture=range(L), loss_fn=logits)

    worst = 0.0
    with torch.no_grad():
        packed = exits(masked, tokens, keep)
        ids = docs_cfg.mask(tokens.cpu(), flex=False).ids
        for r in range(tokens.shape[0]):
            for d in ids[r].unique().tolist():
                pos = (ids[r] == d).nonzero().flatten()
                a, b = int(pos[0]), int(pos[-1]) + 1
                own = [None if k is None else torch.tensor([0] if r in k else [], dtype=torch.long, device=device)
                       for k in keep_rows]
                alone = exits(causal, tokens[r:r + 1, a:b], own)
                worst = max(worst, max(float((packed[l][r, a:b] - alone[l][0]).abs().max()) for l in range(L)))
    return {"max_abs_diff": worst, "form": "FlexAttention BlockMask" if device.type == "cuda" else "dense mask"}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None, help=f"comma-separated of {', '.join(SHAPES)} (default: "
                    "quickstart,seq2048 on CPU, llama3_2_1b on CUDA)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each mode)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compile happens here)")
    ap.add_argument("--doc-tokens", type=float, default=1024.0, help="mean document length in tokens")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (CPU time is measured)")
    ap.add_argument("--no-compile", action="store_true", help="CUDA: eager blocks (the recipe compiles them)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    names = (args.shapes or ("llama3_2_1b" if cuda else "quickstart,seq2048")).split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    if not cuda:
        torch.set_num_threads(args.threads)
    compiled = cuda and not args.no_compile
    exact = check_exactness(device)
    print(f"exactness ({exact['form']}): packed documents vs alone, every exit, largest difference "
          f"{exact['max_abs_diff']:.2e}", file=sys.stderr, flush=True)
    if not exact["max_abs_diff"] <= 1e-3:
        sys.exit(f"document masking is not exact on {device}: largest difference {exact['max_abs_diff']:.2e}")
    results = {n: measure(n, SHAPES[n], args.rounds, args.warmup, args.doc_tokens, device, dtype, compiled)
               for n in names}
    device_name = torch.cuda.get_device_name(0) if cuda else f"cpu, {args.threads} thread(s), CPU time"
    print(f"device: {device_name}; torch {torch.__version__}, {dtype}; mean document {args.doc_tokens:.0f} tokens; "
          f"{args.rounds} timed rounds after {args.warmup}{'; compiled blocks' if compiled else ''}\n")
    print("| shape | seq x batch | documents per window | causal ms | block_causal ms | masked / causal |")
    print("|---|---|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['seq']} x {r['batch']} | {r['docs_per_window']:.1f} | {r['causal']['median_ms']:.0f} | "
              f"{r['block_causal']['median_ms']:.0f} | {r['masked_over_causal']:.3f} |")
    if args.out:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": device_name, "torch": torch.__version__, "dtype": str(dtype), "commit": _commit(),
                "command": "python " + " ".join(sys.argv), "doc_tokens": args.doc_tokens, "rounds": args.rounds,
                "warmup": args.warmup, "compiled": compiled, "exactness": exact}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
