"""Downstream task accuracy of every early exit, with lm-evaluation-harness (the paper's Tables 1-2).

    python -m train.eval_exits --model RUN_DIR|HF_DIR --exits 4,8,L --tasks TASKS [--limit N]
        [--include-path DIR] [--num-fewshot K] [--batch-size N] [--json FILE] [--plot FILE.png]

For each exit E the exported Hugging Face `LlamaForCausalLM` is cut to its first E blocks + the
shared final norm + output head (its layer list and `num_hidden_layers` shortened, in place and
restored afterwards: one load for all exits) and handed to lm-eval's own `HFLM` as a model
object; lm-eval then runs TASKS exactly as it runs any Hugging Face model. `L` in --exits means
the full depth (default: L/4, L/2, 3L/4, L).

TASKS are lm-eval task names (`hellaswag,arc_easy`, which lm-eval downloads), or tasks defined by
local YAML files over local data in the folder given by --include-path (lm-eval's own option;
clusters are often offline): see docs/decoding.md.

--model: a Hugging Face export (config.json + safetensors + tokenizer), a Hugging Face Hub id
(org/name[@revision], fetched by train/hub.py), or a run directory, whose
newest complete checkpoint (or --step N) is first exported to a temporary folder so that the
report can name the checkpoint step (a run directory without checkpoints but with RUN_DIR/hf
uses that export; its step is then unknown, null).

Output: a markdown table (task metric by exit) on stdout; --json holds
`{"model", "step", "n_layers", "exits", "tasks", "limit", "results": {"<E>": {task: {metric: value}}}}`
(metric names as lm-eval's without the ",none" filter suffix, e.g. `acc`, `acc_stderr`,
`acc_norm`); --plot draws the score by exit (train/report.py). lm-eval is the optional `eval`
extra: pip install 'layerskip-titan[eval]'.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger("train.eval_exits")
_INSTALL = "pip install 'layerskip-titan[eval]'"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"python -m train.eval_exits needs lm-evaluation-harness: {_INSTALL} ({e})") from None


@contextlib.contextmanager
def resolve_model(path: str, step: int | None) -> Iterator[tuple[Path, int | None]]:
    """(Hugging Face folder, checkpoint step or None) for --model; a run directory's checkpoint is
    exported to a temporary folder that lives as long as the context. A Hub id is fetched."""
    from train.hub import hub_folder
    if (folder := hub_folder(path, "--model")) is not None:
        path = str(folder)
    p = Path(path)
    if (p / "config.json").is_file():
        if step is not None:
            raise SystemExit(f"--step {step}: --model {path} is a Hugging Face export, not a run directory")
        yield p, None
        return
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        from train.checkpoint import CheckpointError, read_meta, select_checkpoint, verify_files
        from train.export import export_run
        try:
            chosen = select_checkpoint(p / "checkpoints", "latest" if step is None else str(step), verify_files)
        except CheckpointError as e:
            raise SystemExit(f"--model {path} --step {step}: {e}") from None
        if chosen is None:
            raise SystemExit(f"--model {path}: no complete checkpoint in {p / 'checkpoints'}")
        found = int(read_meta(chosen)["step"])
        with tempfile.TemporaryDirectory(prefix="eval_exits-") as tmp:
            log.info("exporting %s to a temporary Hugging Face folder", chosen)
            yield export_run(p, Path(tmp) / "hf", step=found, dtype=torch.float32), found
        return
    if (p / "hf" / "config.json").is_file() and step is None:
        yield p / "hf", None
        return
    raise SystemExit(f"--model {path}: neither a Hugging Face export (no {p}/config.json) nor a run directory "
                     f"with checkpoints ({p}/config.yaml and {p}/checkpoints/)")


@contextlib.contextmanager
def truncated(model, n_blocks: int):
    """`model` (a transformers LlamaForCausalLM) running only its first `n_blocks` decoder blocks,
    then its final norm and head: an early exit at E = n_blocks. Restored on exit."""
    inner, config = model.model, model.config
    layers, depth = inner.layers, config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if not 1 <= n_blocks <= len(layers):
        raise ValueError(f"exit {n_blocks} is outside 1..{len(layers)}")
    inner.layers = torch.nn.ModuleList(list(layers)[:n_blocks])
    config.num_hidden_layers = n_blocks  # also sizes the KV cache
    if layer_types is not None:
        config.layer_types = list(layer_types)[:n_blocks]
    try:
        yield model
    finally:
        inner.layers, config.num_hidden_layers = layers, depth
        if layer_types is not None:
            config.layer_types = layer_types


def _metrics(task_result: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": .., "acc_stderr,none": .., "alias": .., "sample_len": ..} ->
    {"acc": .., "acc_stderr": ..}: its metrics are the keys named "metric,filter"."""
    out = {}
    for key, value in task_result.items():
        name, comma, filt = key.partition(",")
        if comma and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name if filt == "none" else key] = float(value)
    return out


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager. Indexing lm-eval's thousands of built-in task YAMLs takes ~10-20 s,
    so when every task is defined in --include-path only that folder is indexed."""
    from lm_eval.tasks import TaskManager
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def evaluate_exits(hf_dir: Path, exits: list[int], tasks: list[str], *, limit: float | None = None,
                   include_path: str | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                   device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """{"<E>": {task: {metric: value}}} for every exit E, with lm-eval's HFLM on the cut model."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = LlamaForCausalLM.from_pretrained(str(hf_dir)).to(device=device, dtype=dtype).eval()
    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (local task YAMLs: --include-path DIR)"
        raise SystemExit(f"--tasks: {unknown} are not lm-eval tasks{where}")
    results = {}
    for E in exits:
        with truncated(model, E):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                  task_manager=manager, log_samples=False)
        results[str(E)] = {task: _metrics(r) for task, r in out["results"].items()}
        log.info("exit %d: %s", E, results[str(E)])
    return results


def markdown_table(results: dict[str, dict]) -> str:
    exits = sorted(results, key=int)
    rows = sorted({(task, metric) for e in exits for task, ms in results[e].items() for metric in ms
                   if not metric.endswith("_stderr")})
    lines = ["| task | metric | " + " | ".join(f"exit {e}" for e in exits) + " |",
             "|---|---|" + "---|" * len(exits)]
    for task, metric in rows:
        cells = []
        for e in exits:
            m = results[e].get(task, {})
            value, err = m.get(metric), m.get(f"{metric}_stderr")
            cells.append("" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if err else ""))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_exits(spec: str | None, n_layers: int) -> list[int]:
    if not spec:
        return sorted({max(1, n_layers * k // 4) for k in (1, 2, 3, 4)})
    exits = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            exits.append(n_layers if part == "L" else int(part))
        except ValueError:
            raise SystemExit(f"--exits: {part!r} is neither an integer nor L") from None
    bad = [e for e in exits if not 1 <= e <= n_layers]
    if bad or not exits:
        raise SystemExit(f"--exits must be in 1..{n_layers} (L = {n_layers} blocks), got {spec!r}")
    return sorted(set(exits))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m train.eval_exits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF export folder or run directory")
    ap.add_argument("--step", type=int, help="checkpoint step of a run directory (default: newest complete)")
    ap.add_argument("--exits", help="exits E (blocks run) as 4,8,L; L = full depth (default: L/4,L/2,3L/4,L)")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--include-path", help="folder of extra lm-eval task YAMLs (e.g. over local data)")
    ap.add_argument("--limit", type=float, help="items per task (lm-eval's --limit; < 1 = a fraction)")
    ap.add_argument("--num-fewshot", type=int)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--plot", help="write a PNG of the score by exit here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _require_lm_eval()
    if args.include_path and not Path(args.include_path).is_dir():
        raise SystemExit(f"--include-path {args.include_path}: no such folder")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    with resolve_model(args.model, args.step) as (hf_dir, step):
        n_layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
        exits = parse_exits(args.exits, n_layers)
        results = evaluate_exits(hf_dir, exits, tasks, limit=limit, include_path=args.include_path,
                                 num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                 device=args.device, dtype=getattr(torch, args.dtype))
    report = {"model": str(Path(args.model).resolve()), "step": step, "n_layers": n_layers, "exits": exits,
              "tasks": tasks, "limit": limit, "results": results}
    print(f"\nDownstream score by exit E (blocks run of {n_layers}); model {args.model}"
          + (f", checkpoint step {step}" if step is not None else ""))
    print(markdown_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        from train.report import plot_exit_scores
        plot_exit_scores(report, args.plot)
        print(f"\nplot: {args.plot}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
