"""Embedding cells with a pretrained model and scoring the embeddings."""
