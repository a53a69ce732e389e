"""SmolLM2-135M on one machine: Hugging Face's plain training step against our trainer.

In one run, on the same machine, model (bench/smollm2.py: SmolLM2-135M, tied embeddings, fp32)
and batch (4 x 128 tokens per process):
- hf:            transformers' LlamaForCausalLM as shipped (tied), forward with labels (its own
                 loss) + backward + clip_grad_norm_ + foreach AdamW, random tokens;
- ours:          our trainer, exactly as a user runs it: `python -m train model=hf
                 model.init_from=SMOLLM2 layerskip=none data=files ...` (its data, loss,
                 metrics, logging every step), step times from its metrics.jsonl;
- ours_layerskip: the same with the paper's Llama 3 recipe (layerskip=continual_llama3: layer
                 dropout p_max 0.1, early exits on every layer, rotational R=8, e_scale 0.1);
- hf_ddp / ours_ddp / ours_2proc: 2 processes (torchrun, gloo), 4 x 128 tokens per process: HF
                 under DistributedDataParallel; ours replicated as HF is (parallel.dp_replicate=2
                 parallel.dp_shard=1: DDP); ours sharded (the default layout, FSDP2);
                 scaling = tokens/s(2) / tokens/s(1), each side against its own 1-process run;
- validation:    our validation of every exit (loss and top-1 agreement) on the held-out
                 batches, timed, against its FLOP bound.

Every step time is the median over the steps after `--warmup`. Each variant runs in its own
process(es), one after another (never two at once). The FLOP bound of validation: its matmul
FLOPs (the blocks' forward, 2 x non-embedding block parameters + attention per token, plus
2 x dim x vocab per token for each exit's head) at the FLOP rate our LayerSkip-off training step
reached in the same run (torchtitan's count, 6 x parameters + attention per token): how long the
validation would take if it did no more work per FLOP than training.

    flock /tmp/cpu.lock python bench/smollm2_speed.py --out bench/results/smollm2_speed_cpu.json
    python bench/smollm2_speed.py --parts hf,ours --steps 6     # a quick look at two variants

`--synthetic smollm2|tiny` replaces the real checkpoint by a randomly initialised tied Llama of
SmolLM2's shape (or a tiny one) with a small byte-level BPE tokenizer, written here by
transformers: what bench/gpu_suite.sh runs on a GPU machine, which cannot fetch SmolLM2. On a GPU
both sides run in fp32 on the GPU (ours with train.dtype=float32).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH, SEQ = 4, 128
PARTS = ("hf", "ours", "ours_layerskip", "hf_ddp", "ours_ddp", "ours_2proc", "validation")


# ------------------------------------------------------------------------------------ HF worker

def hf_worker(model_dir: str, steps: int, out: str) -> None:
    """Runs in its own process (or one per rank under torchrun): HF's plain step, timed."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(rank)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.train()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    times = []
    for _ in range(steps):
        tokens = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), device=device)
        start = time.perf_counter()
        loss = net(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": times, "params": n_params, "tied": tied,
                                         "threads": torch.get_num_threads(), "world": world}))


# ------------------------------------------------------------------------------ validation worker

def _compose(overrides: list[str]):
    """The typed config `python -m train OVERRIDES` runs with (same recipes, same composition)."""
    from hydra import compose, initialize_config_dir

    from train.config import load_config, register_schemas
    from train.hf import resolve_model_shape
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "recipes")):
        return resolve_model_shape(load_config(compose("train", overrides=overrides)))


def validation_worker(overrides: list[str], out: str, repeats: int) -> None:
    """Builds the run as the trainer does (train.trainer.build_run) and times its validation
    (train.validation.validate: every exit's loss and agreement) on the run's held-out batches;
    the first call warms up."""
    import torch

    from parallel.distributed import destroy, init_distributed
    from train.metrics import MetricsLogger, device_peak_flops
    from train.model import flops_per_token
    from train.trainer import build_run
    from train.validation import validate
    cfg = _compose(overrides)
    rank, world, _, device = init_distributed(cfg.parallel.timeout_s)
    try:
        r = build_run(cfg, rank, world, device)
        batches = list(r.data.val_batches(cfg.eval.batches))
        metrics = MetricsLogger(r.run_dir, enabled=False)
        validate(r, batches[:1], metrics)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            vals = validate(r, batches, metrics)
            times.append(time.perf_counter() - start)
        m = cfg.model
        _, _, block_train = flops_per_token(m, r.model, cfg.data.seq_len)
        exits = cfg.eval.exit_list(m.n_layers)
        tokens = sum(inputs.numel() for inputs, _ in batches)
        # forward only: a third of a block's training FLOPs; one head matmul per validated exit
        flops = tokens * (m.n_layers * block_train / 3 + len(exits) * 2 * m.dim * m.vocab_size)
        peak, peak_source = device_peak_flops(device)
        Path(out).write_text(json.dumps({
            "validation_s": times, "exits": len(exits), "tokens": tokens, "flops": flops,
            "peak_flops_s": peak, "peak_source": peak_source,
            "val_loss_final": vals["val/loss/final"], "threads": torch.get_num_threads()}))
    finally:
        destroy()


# --------------------------------------------------------------------------- synthetic checkpoint

SHAPES = {  # transformers LlamaConfig keys; both tied, as SmolLM2
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=256),
}


def synthetic_dir(work: Path, shape: str) -> Path:
    """A tied Llama of `shape` with random weights and a 400-token byte-level BPE tokenizer
    trained on the corpus (speed does not depend on the weights or the tokenizer)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    out = work / f"synthetic-{shape}"
    if (out / "config.json").is_file():
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([(work / "corpus.txt").read_text()[:2_000_000]], trainer=trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<s>", "</s>"])
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    config = transformers.LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, rms_norm_eps=1e-5,
                                      bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------------- the driver

def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _run(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}; see {log}:\n"
                           + log.read_text()[-3000:])


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def _our_overrides(model_dir: Path, work: Path, name: str, steps: int) -> list[str]:
    return ["model=hf", f"model.init_from={model_dir}", "data=files", f"data.source={work / 'corpus.txt'}",
            f"data.cache_dir={work / 'cache'}", f"data.seq_len={SEQ}", f"data.batch_size={BATCH}",
            f"train.steps={steps}", "logging.every=1", "logging.tensorboard=false", "eval.every=0",
            "eval.batches=1", "eval.per_layer=false", "checkpoint.interval=0", "checkpoint.save_final=false",
            f"run_dir={work / 'runs' / name}"]


def _our_step_times(run_dir: Path) -> list[float]:
    times = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "throughput/step_time_s" in record:
            times[record["step"]] = record["throughput/step_time_s"]
    return [times[s] for s in sorted(times)]


def _summary(times: list[float], warmup: int, tokens: int) -> dict:
    kept = times[warmup:]
    step = _median(kept)
    return {"step_s_median": step, "step_s": times, "tokens_per_step": tokens, "tokens_per_s": tokens / step}


def _corpus(work: Path) -> None:
    """Plain text for our runs: this repository's Python sources (prepared once, cached)."""
    path = work / "corpus.txt"
    if not path.exists():
        text = "".join(p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("train/**/*.py")))
        path.write_text(text * 4, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--steps", type=int, default=12, help="steps per variant (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--work", default="/tmp/smollm2_speed", help="runs, logs and prepared data")
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    ap.add_argument("--synthetic", choices=sorted(SHAPES), help="a random tied Llama of this shape, not SmolLM2")
    ap.add_argument("--val-batches", type=int, default=4, help="held-out batches of 4 x 128 tokens validated")
    ap.add_argument("--worker", choices=["hf", "validation"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "hf":
        return hf_worker(args.model_dir, args.steps, args.result)
    if args.worker == "validation":
        return validation_worker(args.overrides, args.result, repeats=2)

    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    _corpus(work)
    if args.synthetic:
        model_dir = synthetic_dir(work, args.synthetic)
    else:
        from bench.smollm2 import smollm2_dir
        model_dir = smollm2_dir()
    import torch
    gpu = torch.cuda.is_available()
    results: dict = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": os.uname().nodename,
        "cpus": os.cpu_count(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "model": str(model_dir), "synthetic": args.synthetic, "device": "cuda" if gpu else "cpu", "batch": BATCH, "seq": SEQ, "steps": args.steps, "warmup": args.warmup,
        "command": "python bench/smollm2_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}}
    tokens = BATCH * SEQ

    def hf(name: str, nproc: int) -> None:
        result = work / f"{name}.json"
        cmd = ([sys.executable] if nproc == 1 else _torchrun(nproc)) + [
            str(Path(__file__).resolve()), "--worker", "hf", "--model-dir", str(model_dir),
            "--steps", str(args.steps), "--result", str(result)]
        _run(cmd, work / "logs" / f"{name}.log", timeout_s=1200)
        r = json.loads(result.read_text())
        results[name] = {**_summary(r["step_s"], args.warmup, tokens * nproc), "params": r["params"],
                         "tied": r["tied"], "processes": nproc, "threads_per_process": r["threads"]}

    def ours(name: str, nproc: int, *extra: str) -> None:
        overrides = _our_overrides(model_dir, work, name, args.steps) + list(extra) + (["train.dtype=float32"] if gpu else [])
        cmd = ([sys.executable, "-m", "train"] if nproc == 1 else _torchrun(nproc) + ["-m", "train"]) + overrides
        _run(cmd, work / "logs" / f"{name}.log", timeout_s=1800)
        results[name] = {**_summary(_our_step_times(work / "runs" / name), args.warmup, tokens * nproc),
                         "processes": nproc, "command": "python -m train " + " ".join(overrides)}
        if name == "ours":  # torchtitan's count: 6 x parameters + attention per token
            from train.model import build_model, flops_per_token
            cfg = _compose(overrides)
            params, per_token, _ = flops_per_token(cfg.model, build_model(cfg.model), SEQ)
            results[name].update(params=params, flops_per_step=per_token * tokens)

    def validation() -> None:
        result = work / "validation.json"
        overrides = _our_overrides(model_dir, work, "validation", 1) + [
            "layerskip=none", "eval.per_layer=true", f"eval.batches={args.val_batches}"]
        _run([sys.executable, str(Path(__file__).resolve()), "--worker", "validation", "--result", str(result),
              "--overrides", *overrides], work / "logs" / "validation.log", timeout_s=1800)
        v = json.loads(result.read_text())
        best = min(v["validation_s"])
        bound = v["flops"] / v["peak_flops_s"]
        results["validation"] = {**v, "validation_s_best": best, "flop_bound_s": bound,
                                 "over_flop_bound": best / bound,
                                 "command": "validate() after python -m train " + " ".join(overrides)}
        if "ours" in results:  # the same FLOPs at the rate our training step reached
            r = results["ours"]
            train_rate = r["flops_per_step"] / r["step_s_median"]
            results["validation"]["over_training_rate"] = best / (v["flops"] / train_rate)

    for part in parts:
        print(f"[smollm2_speed] {part} ...", flush=True)
        if part == "hf":
            hf("hf", 1)
        elif part == "hf_ddp":
            hf("hf_ddp", 2)
        elif part == "ours":
            ours("ours", 1, "layerskip=none")
        elif part == "ours_2proc":
            ours("ours_2proc", 2, "layerskip=none")
        elif part == "ours_ddp":
            ours("ours_ddp", 2, "layerskip=none", "parallel.dp_replicate=2", "parallel.dp_shard=1")
        elif part == "ours_layerskip":
            ours("ours_layerskip", 1, "layerskip=continual_llama3")
        elif part == "validation":
            validation()
        print(f"[smollm2_speed] {part}: {json.dumps({k: v for k, v in results[part].items() if k != 'step_s'})}",
              flush=True)
    if "hf" in results and "ours" in results:
        results["ours_over_hf_speed_1proc"] = results["hf"]["step_s_median"] / results["ours"]["step_s_median"]
    if all(k in results for k in ("hf", "hf_ddp", "ours")):
        results["scaling_2proc"] = {"hf_ddp": results["hf_ddp"]["tokens_per_s"] / results["hf"]["tokens_per_s"]}
        for name, key in (("ours_ddp", "ours_ddp"), ("ours_fsdp", "ours_2proc")):
            if key in results:
                results["scaling_2proc"][name] = results[key]["tokens_per_s"] / results["ours"]["tokens_per_s"]
    results["meta"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
