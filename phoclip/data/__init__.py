"""Data: shards and their manifest, the training stream, images, transforms, text, dataset readers."""
