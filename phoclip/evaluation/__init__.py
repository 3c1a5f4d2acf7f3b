"""Evaluation: embedding loops and recall@K, published test splits and their tables."""

# Images per forward of every evaluation (a run's validation and phoclip-eval alike):
# captions are packed per batch, so the same batches give the same features to the last
# digit. Here, not in retrieval.py, so the command's --help reads it without torch.
EVAL_BATCH_SIZE = 128
