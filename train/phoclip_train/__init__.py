"""Training machinery: config, engines (DDP / DeepSpeed), checkpointing, the loop."""
