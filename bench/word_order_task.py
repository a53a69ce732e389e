"""A local lm-eval task over local data, for `python -m train.eval_exits --include-path DIR`.

    python bench/word_order_task.py --text RUN_DIR/heldout.txt --out tasks/ [--items 200] [--name word_order]

Two-way multiple choice, a grammaticality probe in the manner of BLiMP: after a held-out line,
which is the next line, the real one or the same words in a shuffled order? Both choices hold the
same words, so only the model's sense of order decides (chance 0.5); a tiny model trained for a
few minutes already scores well above chance, and its early exits show how much of that each
depth has. It needs no download, so it runs where lm-eval's own tasks cannot (offline clusters,
CI), and it is docs/decoding.md's example of a task YAML over local JSON lines.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def write_task(text: str, folder: Path, name: str = "word_order", n_items: int = 200, seed: int = 0,
               cache_dir: Path | None = None) -> Path:
    """Write folder/NAME.yaml and folder/NAME.jsonl: `n_items` items from `text`'s lines of 4 to 24
    words that follow a non-empty line. Returns the folder (for --include-path)."""
    rows = [l.strip() for l in text.splitlines() if l.strip()]
    pairs = [(prev, line) for prev, line in zip(rows, rows[1:]) if 4 <= len(line.split()) <= 24]
    if len(pairs) < n_items:
        raise SystemExit(f"the text has {len(pairs)} usable lines; {n_items} are needed (lower --items)")
    rng = random.Random(seed)
    items = []
    for prev, line in rng.sample(pairs, n_items):
        words = line.split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        choices = [line, " ".join(shuffled)]
        label = rng.randrange(2)
        items.append({"context": prev, "choices": choices if label == 0 else choices[::-1], "label": label})
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    cache = f"\n  cache_dir: {cache_dir}" if cache_dir else ""
    (folder / f"{name}.yaml").write_text(f"""\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}{cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: "\\n"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True, help="held-out text (e.g. RUN_DIR/heldout.txt)")
    ap.add_argument("--out", required=True, help="folder for the task YAML and its data (--include-path)")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--name", default="word_order")
    args = ap.parse_args()
    folder = write_task(Path(args.text).read_text(encoding="utf-8"), Path(args.out), args.name, args.items)
    print(f"task {args.name}: {folder / (args.name + '.yaml')} ({args.items} items)")


if __name__ == "__main__":
    main()
