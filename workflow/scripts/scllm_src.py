"""Put the repository's src/ first on sys.path, so rule scripts import this checkout's scllm
without an install step (in conda envs and on cluster nodes too). Snakemake puts this folder on
the path of every rule script; scripts import this module before importing scllm."""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
