"""scLLM-pretrain: sample blood cells from the CELLxGENE Census, preprocess them and pretrain an
scGPT-style transformer. Importing the package is light; torch loads only when a model is used."""

__version__ = "0.1.0"
__all__ = ["embed", "load_model"]


def __getattr__(name):
    # Lazy: `import scllm` must not import torch.
    if name in ("embed", "load_model"):
        import scllm.eval.embed as embedding

        return getattr(embedding, name)
    raise AttributeError(f"module 'scllm' has no attribute {name!r}")
