"""``python -m scllm.launch``: the command each node runs to start its training processes. It is
torchrun (same arguments) with this project's exit status; the launcher itself is
``scllm.train.launch``."""

import sys

from scllm.train.launch import main

if __name__ == "__main__":
    sys.exit(main())
