"""scLLM-pretrain: sample blood cells from the CELLxGENE Census, preprocess them and pretrain an
scGPT-style transformer. Importing the package is light; torch loads only when a model is used."""

__version__ = "0.1.0"
__all__ = ["embed", "gene_embeddings", "load_model"]


def __getattr__(name):
    """The package's functions, imported when first used: ``import scllm`` must not import
    torch.

    Parameters
    ----------
    name : str
        The attribute asked for: ``embed``, ``gene_embeddings`` or ``load_model``.

    Returns
    -------
    callable
        ``scllm.eval.embed.embed``, ``scllm.eval.gene_embeddings.gene_embeddings`` or
        ``scllm.train.checkpoint.load_model``.

    Raises
    ------
    AttributeError
        Any other name.
    """
    if name == "embed":
        from scllm.eval.embed import embed

        return embed
    if name == "gene_embeddings":
        from scllm.eval.gene_embeddings import gene_embeddings

        return gene_embeddings
    if name == "load_model":
        from scllm.train.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'scllm' has no attribute {name!r}")
