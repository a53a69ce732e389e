"""Pictures of a training run and of a checkpoint's evaluations, drawn with matplotlib (Agg).

    python -m train.report RUN_DIR [RUN_DIR ...] [--out FILE.png] [--labels A,B,...]

One run: one PNG with four panels read from RUN_DIR/metrics.jsonl: the training loss of every
exit over steps, the validation loss of every exit over steps, the measured layer-dropout rate of
every block, and the exit weights over steps (default: RUN_DIR/report.png). Exits are numbered E =
blocks run (1..L, E = L the full model), as in the metric names (`val/loss/exit_04`) and
everywhere else; blocks 1..L (block E is the one whose output is exit E).
Several runs (e.g. a LayerSkip run and its `layerskip=none` baseline, as the paper compares):
one PNG overlaying them: the validation loss of every exit at the last validation (one line per
run), the validation loss of every exit over steps (colour = exit, line style = run), the full
model's training loss over steps, and the exit agreement at the last validation (default:
./report.png). Both print the last validation of each run as a markdown table.

The figures of `python -m train.decode` (`plot_decode`) and `python -m train.eval_exits`
(`plot_exit_scores`) are drawn here too, so every picture of the project shares one style.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from train.metrics import KEY_PATTERN, block_key, exit_key  # noqa: E402

_LINESTYLES = ["-", "--", ":", "-."]
_RUN_COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
# Keys of runs written before exits were counted in blocks run: `.../layer_XX` named block index
# XX (0..L-1), i.e. exit XX + 1 (or, for the dropout rate, block XX + 1). Read as the new names.
_OLD_LAYER_KEY = re.compile(r"^(?P<prefix>.+)/layer_(?P<layer>\d+)$")


# --------------------------------------------------------------------------- reading a run

def read_metrics(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """{step: {key: value}} from RUN_DIR/metrics.jsonl. A step's training and validation records
    are merged; a resumed run rewrites steps, and the last record of a step wins. Non-finite
    values (written as strings) become NaN. Old `.../layer_XX` keys are read as the exit (block)
    XX + 1."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a run directory written by `python -m train`")
    steps: dict[int, dict[str, float]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n} is not a JSON line") from None
        values = steps.setdefault(int(record["step"]), {})
        for k, v in record.items():
            if k not in ("step", "time"):
                values[_current_key(k)] = float(v)  # float("nan") / float("inf") for the string forms
    return dict(sorted(steps.items()))


def _current_key(key: str) -> str:
    m = _OLD_LAYER_KEY.match(key)
    if not m:
        return key
    number = int(m["layer"]) + 1
    if m["prefix"] == "layerskip/drop_fraction":
        return block_key(m["prefix"], number)
    return exit_key(m["prefix"], number)


def by_exit(metrics: dict[int, dict[str, float]], prefix: str) -> dict[int, tuple[list[int], list[float]]]:
    """{E: (steps, values)} of the keys `prefix/exit_EE` (exit E, blocks run), e.g. prefix
    "val/loss"; for per-block keys `prefix/block_BB`, {B: ...} (block B = 1..L)."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for step, values in metrics.items():
        for k, v in values.items():
            m = KEY_PATTERN.match(k)
            if m and m["prefix"] == prefix:
                xs, ys = out.setdefault(int(m["number"]), ([], []))
                xs.append(step)
                ys.append(v)
    return dict(sorted(out.items()))


def last_validation(metrics: dict[int, dict[str, float]]) -> tuple[int | None, dict[str, float]]:
    """(step, values) of the last step that has validation values."""
    for step in reversed(list(metrics)):
        if any(k.startswith("val/") for k in metrics[step]):
            return step, metrics[step]
    return None, {}


# --------------------------------------------------------------------------- drawing helpers

_EXIT_LABEL = "exit E (blocks run)"


def _exit_colours(exits: list[int], n_layers: int | None = None) -> dict[int, tuple]:
    """Colour of every exit E (1..L): dark for the first, light for the full model."""
    top = max(n_layers or 0, max(exits, default=0), 2)
    cmap = plt.get_cmap("viridis")
    return {e: cmap((e - 1) / (top - 1)) for e in exits}


def _exit_legend(ax, colours: dict[int, tuple], n_layers: int) -> None:
    """Which colour is which exit: a legend for a few exits, a colour bar for many."""
    if len(colours) <= 12:
        ax.legend(title=_EXIT_LABEL, fontsize="small", ncol=2 if len(colours) > 6 else 1)
    else:
        sm = plt.cm.ScalarMappable(cmap="viridis", norm=mcolors.Normalize(1, max(n_layers, 2)))
        ax.figure.colorbar(sm, ax=ax, label=_EXIT_LABEL)


def _n_layers(metrics: dict[int, dict[str, float]]) -> int:
    """L: the highest exit or block number in the metrics (the full model is exit L)."""
    numbers = [int(m["number"]) for v in metrics.values() for k in v if (m := KEY_PATTERN.match(k))]
    return max(numbers, default=0)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _model_name(path: str) -> str:
    """`run/hf` for an export inside a run directory, else the folder's name."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name == "hf" and p.parent.name else (p.name or "model")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)  # after tight_layout; bbox_inches="tight" would draw twice
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- one run

def plot_run(run_dir: str | Path, out: str | Path, label: str | None = None) -> Path:
    """The four panels of one run (module docstring) into `out`."""
    metrics = read_metrics(run_dir)
    L = _n_layers(metrics)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (a_train, a_val), (a_drop, a_weight) = axes
    fig.suptitle(f"{label or Path(run_dir).name}: {L} layers, {max(metrics, default=0)} steps")

    for ax, prefix, title in ((a_train, "loss", "training loss of every exit (logging windows)"),
                              (a_val, "val/loss", "validation loss of every exit")):
        series = by_exit(metrics, prefix)
        if not series:
            _empty(ax, f"no {prefix}/exit_EE in metrics.jsonl")
            continue
        colours = _exit_colours(list(series), L)
        for e, (xs, ys) in series.items():
            ax.plot(xs, ys, color=colours[e], marker="o" if prefix == "val/loss" else None,
                    markersize=3, label=f"{e}" + (" (full model)" if e == L else ""))
        ax.set(title=title, xlabel="step", ylabel="cross-entropy (nats)")
        ax.grid(alpha=0.3)
        _exit_legend(ax, colours, L)

    drops = by_exit(metrics, "layerskip/drop_fraction")
    if drops:
        blocks = list(drops)
        means = [sum(ys) / len(ys) for _, ys in drops.values()]
        finals = [ys[-1] for _, ys in drops.values()]
        a_drop.bar(blocks, means, color="tab:blue", alpha=0.8, label="mean over the run")
        a_drop.plot(blocks, finals, "o", color="tab:red", label="last logging window")
        a_drop.set(title="layer dropout: share of samples that skipped each block",
                   xlabel="block (1..L; its output is exit E = block)", ylabel="drop rate", xticks=blocks)
        a_drop.legend(fontsize="small")
        a_drop.grid(alpha=0.3, axis="y")
    else:
        _empty(a_drop, "no layer dropout in this run")

    weights = by_exit(metrics, "layerskip/exit_weight")
    if len(weights) > 1:
        colours = _exit_colours(list(weights), L)
        for e, (xs, ys) in weights.items():
            a_weight.plot(xs, ys, color=colours[e], label=f"{e}")
        a_weight.set(title="early-exit loss weight of every exit (window means)", xlabel="step",
                     ylabel="normalised weight")
        a_weight.grid(alpha=0.3)
        _exit_legend(a_weight, colours, L)
    else:
        _empty(a_weight, "no early-exit loss in this run (final layer only)")
    fig.tight_layout()
    return _save(fig, out)


# --------------------------------------------------------------------------- several runs

def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Runs overlaid (module docstring) into `out`."""
    labels = labels or [Path(r).name for r in run_dirs]
    runs = [read_metrics(r) for r in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (a_end, a_val), (a_train, a_agree) = axes
    fig.suptitle("runs compared: " + " vs ".join(labels))
    L_all = max(_n_layers(m) for m in runs)
    colours = _exit_colours(list(range(1, L_all + 1)), L_all)
    any_agree = False
    for i, (metrics, label) in enumerate(zip(runs, labels)):
        c, ls = _RUN_COLOURS[i % len(_RUN_COLOURS)], _LINESTYLES[i % len(_LINESTYLES)]
        L = _n_layers(metrics)
        step, last = last_validation(metrics)
        exits = sorted(int(m["number"]) for k in last
                       if (m := KEY_PATTERN.match(k)) and m["prefix"] == "val/loss" and m["kind"] == "exit")
        if exits:
            a_end.plot(exits, [last[exit_key("val/loss", e)] for e in exits], marker="o", color=c,
                       linestyle=ls, label=f"{label} (step {step})")
        for e, (xs, ys) in by_exit(metrics, "val/loss").items():
            a_val.plot(xs, ys, color=colours[e], linestyle=ls, marker=".", markersize=3)
        train = by_exit(metrics, "loss").get(L)
        if train:
            a_train.plot(*train, color=c, linestyle=ls, label=label)
        agree = [e for e in exits if exit_key("val/agree", e) in last]
        if agree:
            any_agree = True
            a_agree.plot(agree, [last[exit_key("val/agree", e)] for e in agree], marker="o", color=c,
                         linestyle=ls, label=label)
    a_end.set(title="validation loss of every exit, last validation", xlabel=_EXIT_LABEL,
              ylabel="cross-entropy (nats)")
    a_val.set(title="validation loss of every exit over steps", xlabel="step", ylabel="cross-entropy (nats)")
    a_train.set(title="full model's training loss (exit E = L)", xlabel="step", ylabel="cross-entropy (nats)")
    for ax in (a_end, a_agree):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # exits are whole blocks
    for ax in (a_end, a_train):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    a_val.grid(alpha=0.3)
    # Line style = run, colour = exit: two keys.
    handles = [plt.Line2D([], [], color="black", linestyle=_LINESTYLES[i % len(_LINESTYLES)], label=label)
               for i, label in enumerate(labels)]
    if L_all <= 12:
        handles += [plt.Line2D([], [], color=colours[e], label=f"exit {e}") for e in range(1, L_all + 1)]
        a_val.legend(handles=handles, fontsize="x-small", ncol=2)
    else:
        a_val.legend(handles=handles, fontsize="small")
        sm = plt.cm.ScalarMappable(cmap="viridis", norm=mcolors.Normalize(1, max(L_all, 2)))
        fig.colorbar(sm, ax=a_val, label=_EXIT_LABEL)
    if any_agree:
        a_agree.set(title="exit agreement with the full model's top-1, last validation",
                    xlabel=_EXIT_LABEL, ylabel="share of tokens", ylim=(0, 1.02))
        a_agree.grid(alpha=0.3)
        a_agree.legend(fontsize="small")
    else:
        _empty(a_agree, "no val/agree/exit_EE in these runs")
    fig.tight_layout()
    return _save(fig, out)


def markdown_table(run_dirs: list[str | Path], labels: list[str]) -> str:
    """The last validation loss of every exit E = 1..L of each run (and agreement where logged)."""
    rows, L = [], 0
    for run_dir, label in zip(run_dirs, labels):
        step, last = last_validation(read_metrics(run_dir))
        L = max(L, _n_layers({0: last}))
        rows.append((label, step, last))
    exits = range(1, L + 1)
    head = "| run | step | " + " | ".join(f"exit {e}" for e in exits) + " |"
    lines = [head, "|" + "---|" * (L + 2)]
    for label, step, last in rows:
        cell = lambda k: f"{last[k]:.3f}" if k in last and math.isfinite(last[k]) else ""  # noqa: E731
        lines.append(f"| {label} val loss | {step} | "
                     + " | ".join(cell(exit_key("val/loss", e)) for e in exits) + " |")
        if any(exit_key("val/agree", e) in last for e in exits):
            lines.append(f"| {label} agreement | {step} | "
                         + " | ".join(cell(exit_key("val/agree", e)) for e in exits) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- decode report

def _heatmap(ax, grid: list[list[float]], rows: list[int], cols: list[int], title: str, fmt: str,
             cmap: str, norm=None, label: str = "") -> None:
    im = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", origin="lower")
    ax.set(title=title, xlabel="draft length d", ylabel="draft exit E (blocks)",
           xticks=range(len(cols)), xticklabels=cols, yticks=range(len(rows)), yticklabels=rows)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if math.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize="small",
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    ax.figure.colorbar(im, ax=ax, label=label)


def plot_decode(report: dict, out: str | Path) -> Path:
    """The decode report: perplexity of every exit (log scale); acceptance rate and speedup over
    (E, d) as annotated heatmaps; tokens/s of our engine beside Hugging Face's
    `generate(assistant_early_exit=E)` when the report has that comparison."""
    panels = [k for k in ("perplexity", "speculative") if k in report]
    n = (1 if "perplexity" in report else 0) + (2 if "speculative" in report else 0) + (1 if "hf" in report else 0)
    if not panels:
        raise ValueError("the decode report has neither perplexity nor speculative results to plot")
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.4), squeeze=False)
    axes = list(axes[0])
    fig.suptitle(f"{_model_name(report.get('model', ''))}: early exit and self-speculative decoding "
                 f"({report.get('device', '')}, {report.get('dtype', '')})")
    if "perplexity" in report:
        ax = axes.pop(0)
        rows = report["perplexity"]["layers"]
        ppl = [r["perplexity"] for r in rows]
        log_scale = max(ppl) > 10 * min(ppl)  # a log axis only when the exits span a decade
        ax.plot([r["exit"] for r in rows], ppl, "o-", label="exit E")
        ax.axhline(ppl[-1], color="grey", linestyle="--", label="full model")
        ax.set(title=f"perplexity by exit ({report['perplexity']['tokens']} held-out tokens)",
               xlabel="exit E (blocks run)", ylabel="perplexity" + (" (log scale)" if log_scale else ""),
               xticks=[r["exit"] for r in rows], yscale="log" if log_scale else "linear")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    if "speculative" in report:
        spec = report["speculative"]
        runs = spec["runs"]
        exits = sorted({r["exit"] for r in runs})
        drafts = sorted({r["draft"] for r in runs})
        cell = {(r["exit"], r["draft"]): r for r in runs}
        grid = lambda key: [[cell[(e, d)][key] if (e, d) in cell else float("nan") for d in drafts]  # noqa: E731
                            for e in exits]
        _heatmap(axes.pop(0), grid("acceptance_rate"), exits, drafts, "acceptance rate of the drafts",
                 ".2f", "viridis", mcolors.Normalize(0, 1), "accepted / drafted")
        speed = grid("speedup")
        finite = [v for row in speed for v in row if math.isfinite(v)]
        lo, hi = min(finite + [0.99]), max(finite + [1.01])
        mode = "greedy" if "greedy" in spec else "sampled"  # the plain-decoding baseline
        _heatmap(axes.pop(0), speed, exits, drafts,
                 f"speedup over plain {mode} ({spec[mode]['tokens_per_s']:.0f} tokens/s)", ".2f", "RdYlGn",
                 mcolors.TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.99), vmax=max(hi, 1.01)), f"× plain {mode} tokens/s")
    if "hf" in report:
        ax = axes.pop(0)
        hf, ours = report["hf"], {(r["exit"], r["draft"]): r for r in report.get("speculative", {}).get("runs", [])}
        keys = [(r["exit"], r["draft"]) for r in hf["runs"]]
        x = range(len(keys))
        ax.bar([i - 0.2 for i in x], [ours[k]["tokens_per_s"] if k in ours else 0 for k in keys], 0.4,
               label="ours (shared KV cache)")
        ax.bar([i + 0.2 for i in x], [r["tokens_per_s"] for r in hf["runs"]], 0.4,
               label="HF generate(assistant_early_exit=E)")
        mode = "greedy" if "greedy" in hf else "sampled"
        if "speculative" in report:
            ax.axhline(report["speculative"][mode]["tokens_per_s"], color="tab:blue", linestyle="--",
                       label=f"ours, plain {mode}")
        ax.axhline(hf[mode]["tokens_per_s"], color="tab:orange", linestyle="--", label=f"HF, plain {mode}")
        ax.set(title="self-speculative decoding: ours vs Hugging Face", xlabel="(E, d)", ylabel="tokens/s",
               xticks=list(x), xticklabels=[f"{e},{d}" for e, d in keys])
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    return _save(fig, out)


# --------------------------------------------------------------------------- eval_exits

def plot_exit_scores(report: dict, out: str | Path) -> Path:
    """Downstream score by exit E: one line per (task, metric), with the standard error as bars."""
    results = report["results"]
    exits = sorted(results, key=int)
    series: dict[tuple[str, str], tuple[list[int], list[float], list[float]]] = {}
    for e in exits:
        for task, metrics in results[e].items():
            for metric, value in metrics.items():
                if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                err = metrics.get(f"{metric}_stderr")
                xs, ys, errs = series.setdefault((task, metric), ([], [], []))
                xs.append(int(e))
                ys.append(float(value))
                errs.append(float(err) if isinstance(err, (int, float)) and math.isfinite(err) else 0.0)
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for (task, metric), (xs, ys, errs) in series.items():
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=f"{task} {metric}")
    ax.set(title=f"{_model_name(report.get('model', ''))}: downstream score by exit"
                 + (f" (step {report['step']})" if report.get("step") is not None else ""),
           xlabel="exit E (blocks run, then the shared norm + head)", ylabel="score",
           xticks=[int(e) for e in exits])
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")
        if all(0 <= y <= 1 for _, ys, _ in series.values() for y in ys):
            ax.set_ylim(0, 1)  # accuracies: the whole scale, so chance levels read right
    fig.tight_layout()
    return _save(fig, out)


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (each holds metrics.jsonl)")
    ap.add_argument("--out", help="PNG to write (default: RUN_DIR/report.png for one run, ./report.png for several)")
    ap.add_argument("--labels", help="comma-separated names of the runs in the legend (default: folder names)")
    args = ap.parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels: {len(labels)} names for {len(args.runs)} runs")
    try:
        if len(args.runs) == 1:
            out = plot_run(args.runs[0], args.out or Path(args.runs[0]) / "report.png", labels[0])
        else:
            out = plot_runs(args.runs, args.out or "report.png", labels)
        print(markdown_table(args.runs, labels))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(f"\nreport: {out}")
    return out


if __name__ == "__main__":
    main()
