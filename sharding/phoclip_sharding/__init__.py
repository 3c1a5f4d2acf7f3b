"""Turn Vietnamese caption datasets into WebDataset shards (see make_shards.py)."""
