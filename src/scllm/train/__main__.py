"""``python -m scllm.train``: one training process (rule pretrain, and every process torchrun
starts)."""

from scllm.train.loop import main

if __name__ == "__main__":
    main()
