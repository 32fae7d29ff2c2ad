"""Embedding and evaluation of what a model learned."""
