"""The data stages, from a Census (or your h5ad) to token shards."""
