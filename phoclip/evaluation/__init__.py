"""Evaluation: embedding loops and recall@K, published test splits and their tables."""
