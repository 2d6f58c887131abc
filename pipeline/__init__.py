"""hybridir: a DVC pipeline for hybrid batch training of multilingual dense retrievers."""
