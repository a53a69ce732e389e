"""A local lm-eval task over local data, for `python -m train.eval_exits --include-path DIR`.

    python bench/continuation_task.py --text RUN_DIR/heldout.txt --out tasks/ [--items 200] [--name continuation]

Multiple choice: given the first words of a held-out line, which of four endings is its own (the
other three are endings of other lines)? Chance is 0.25. It needs no download, so it runs where
lm-eval's own tasks cannot (offline clusters, CI), and it is the example the README shows of a
task YAML over local JSON lines.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def write_task(text: str, folder: Path, name: str = "continuation", n_items: int = 200, seed: int = 0,
               cache_dir: Path | None = None) -> Path:
    """Write folder/NAME.yaml and folder/NAME.jsonl (`n_items` items from `text`'s lines of at
    least 8 words: the first 4 words are the context, words 5-8 the right ending). Returns folder."""
    lines = [words for line in text.splitlines() if len(words := line.split()) >= 8]
    if len(lines) < max(n_items, 4):
        raise SystemExit(f"the text has {len(lines)} lines of 8+ words; {max(n_items, 4)} are needed")
    rng = random.Random(seed)
    items = []
    for words in rng.sample(lines, n_items):
        endings = [" ".join(words[4:8])] + [" ".join(other[4:8]) for other in rng.sample(lines, 3)]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": " ".join(words[:4]), "choices": [endings[i] for i in order],
                      "label": order.index(0)})
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
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True, help="held-out text (e.g. RUN_DIR/heldout.txt)")
    ap.add_argument("--out", required=True, help="folder for the task YAML and its data (--include-path)")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--name", default="continuation")
    args = ap.parse_args()
    folder = write_task(Path(args.text).read_text(encoding="utf-8"), Path(args.out), args.name, args.items)
    print(f"task {args.name}: {folder / (args.name + '.yaml')} ({args.items} items)")


if __name__ == "__main__":
    main()
