"""Pretraining. ``from scllm.train import pretrain`` works as before the package existed; the
names load lazily, so importing a part of the package (its launcher, its checkpoints) does not
import the training loop."""

# Where each public name lives; imported on first use.
_EXPORTS = {
    "pretrain": "scllm.train.loop",
    "TrainingPreempted": "scllm.train.distributed",
    "PREEMPTED_EXIT_CODE": "scllm.train.distributed",
    "NonFiniteLossError": "scllm.train.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'scllm.train' has no attribute {name!r}")
