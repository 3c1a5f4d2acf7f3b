"""Search: the embedding index, building it, queries, result galleries."""
