"""``python -m scllm.train``: one training process (rule pretrain, and every process torchrun
starts)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from scllm.files import setup_logging
from scllm.train.distributed import PREEMPTED_EXIT_CODE, TrainingPreempted
from scllm.train.loop import pretrain


def main(argv=None) -> None:
    """One training process: parse the options, set up the log and run ``pretrain``.

    Under torchrun every rank runs it (ranks other than 0 log to stderr only, each line marked with
    its rank). A preempted run exits with PREEMPTED_EXIT_CODE, which asks for a requeue.

    Parameters
    ----------
    argv : list of str or None, default None
        The options (``--manifest``, ``--out``, ``--params``, ``--log``); None reads sys.argv.
    """
    parser = argparse.ArgumentParser(
        prog="python -m scllm.train", description="Pretrain the cell transformer on token shards."
    )
    parser.add_argument(
        "--manifest", required=True, help="manifest.json written by tokenize_shards"
    )
    parser.add_argument(
        "--out", required=True, help="output directory (resumed if it holds a checkpoint)"
    )
    parser.add_argument("--params", help='JSON file {"model": {...}, "train": {...}}')
    # --log-file too: torchrun's parser rejects "--log" as an ambiguous prefix of its --log-dir.
    parser.add_argument(
        "--log", "--log-file", dest="log", help="log file (rank 0); use --log-file under torchrun"
    )
    # command-line options (the run's own settings are args.json: checkpoint.run_args)
    options = parser.parse_args(argv)
    params = json.loads(Path(options.params).read_text()) if options.params else {}
    unknown = set(params) - {"model", "train"}
    if unknown:
        parser.error(
            f"{options.params}: unknown sections {sorted(unknown)}; expected 'model' and 'train'"
        )
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # append: under torchrun the launching rule script has already written to this log
    log = setup_logging(options.log if rank == 0 else None, append=True)
    if world_size > 1:  # every rank logs to stderr, gathered into the rule log: say whose line
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setFormatter(
                    logging.Formatter(
                        f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"
                    )
                )
    try:
        pretrain(options.manifest, options.out, params.get("model"), params.get("train"), log=log)
    except TrainingPreempted:  # already logged; the exit status asks for a requeue
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
