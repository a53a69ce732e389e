"""An offline Hugging Face Hub cache seeded from a local folder, in huggingface_hub's own layout.

    seed_hub_cache(hf_home, "org/name", folder)   # then HF_HOME=hf_home HF_HUB_OFFLINE=1

`snapshot_download(repo)` offline reads `HF_HOME/hub/models--org--name/refs/<revision>` (the
commit hash) and returns `snapshots/<hash>/` if that folder exists (huggingface_hub 1.x-2.x,
`_snapshot_download.py`). The files are symbolic links, as in a real cache (there to blobs/), so
seeding costs no copy of the weights.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def seed_hub_cache(hf_home: Path, repo_id: str, folder: Path, revision: str = "main",
                   commit: str | None = None) -> Path:
    """Make `repo_id` at `revision` resolve offline to `folder`'s files, as snapshot `commit`
    (default: one derived from the id and revision); returns the snapshot. Seeding another
    commit of the same revision is what the cache looks like after the Hub repository changed."""
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()  # 40 hex digits, like git's
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in Path(folder).iterdir():
        if f.is_file() and not (snapshot / f.name).exists():
            (snapshot / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
