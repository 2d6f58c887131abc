"""The parts of contrastive training the `train` stage puts together: planned batches as texts, the
InfoNCE loss and its cached-gradient path, the language adversary, checkpoints, and data parallelism."""
