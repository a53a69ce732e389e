"""`python -m train [overrides]` and `torchrun ... -m train [overrides]`.

Hydra composes recipes/train.yaml with the overrides on every rank; the result is converted once
into the typed `Config` (errors name the key) and handed to the trainer. Hydra itself writes
nothing: the trainer's global rank 0 owns the run directory.

Exit status: 0 done; 2 invalid configuration or data (one line naming the key or the file);
75 preempted after saving a checkpoint (0 under torchrun, see train/preemption.py; the launch
scripts exit 75); 1 anything else (with its traceback).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # first, before the heavy imports: a refused restart ends at once
    from train.preemption import refuse_to_start
    if stopped := refuse_to_start():  # an elastic restart after a failed preemption save
        print(f"[rank{os.environ.get('RANK', '0')}] not starting: the job was stopped by {stopped} "
              f"(train/preemption.py); the launch script reports why", file=sys.stderr)
        sys.exit(0)

import hydra
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from train.config import ConfigError, load_config, register_schemas
from train.data.sources import DataError
from train.preemption import Preempted
from train.preemption import exit_code as preempted_exit_code

RECIPES = str(Path(__file__).resolve().parent.parent / "recipes")


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    # Only rank 0 speaks at INFO; other ranks report warnings and errors (prefixed with their rank).
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        force=True)


@record  # torchrun's per-rank error file: a crashed worker leaves its traceback there
@hydra.main(version_base="1.3", config_path=RECIPES, config_name="train")
def main(cfg: DictConfig) -> None:
    _setup_logging()
    try:
        config = typed = load_config(cfg)  # `typed` names the run (train/run_identity.py)
        if not config.parallel.dry_run and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # The ranks meet first, so that each node fetches its Hub ids once and an error is
            # every rank's (train/hub.py); the trainer reuses this process group.
            from parallel.distributed import init_distributed
            init_distributed(config.parallel.timeout_s)
        from train.hub import resolve_hub_ids  # Hub ids -> local folders, before anything reads them
        config = resolve_hub_ids(config)
        if config.model.unset_shape_keys:  # model=hf: the shape is model.init_from's config.json
            from train.hf import resolve_model_shape
            config = resolve_model_shape(config)
        if config.parallel.dry_run:  # one CPU process, a fake process group: no launch needed
            from train.memory_estimate import dry_run
            dry_run(config, " ".join(["python -m train", *sys.argv[1:]]))
            return
        # An imported model without a tokenizer stops here, before a run directory exists.
        from train.data.tokenizer import resolve_tokenizer_path
        resolve_tokenizer_path(config.data, config.model)
        # The layout needs only the world size: check it before the heavy imports.
        from parallel.dims import ParallelDims
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ParallelDims.from_config(config.parallel, world).check_model(
            config.model, config.data.seq_len)
        from train.trainer import run
        run(config, typed)
    except ConfigError as e:
        logging.getLogger("train").error("invalid configuration: %s", e)
        sys.exit(2)
    except DataError as e:  # bad input, like a bad setting: one line naming the file, no traceback
        logging.getLogger("train").error("data error: %s", e)
        sys.exit(2)
    except Preempted as e:
        logging.getLogger("train").warning("%s; rerun the same command to resume", e)
        sys.exit(preempted_exit_code())
    finally:
        from parallel.distributed import destroy
        destroy()  # the process group, if the run stopped before the trainer took it over


if __name__ == "__main__":
    register_schemas()
    main()
