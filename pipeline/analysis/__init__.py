"""Tools that read finished runs (DVC experiments, git revisions, the workspace) and compare them:
paired statistics, a search's table and frontier, the ratio sweep, what fine-tuning lost."""
