"""Everything datadiet persists: the Redis sample buffer, SQL metadata and checkpoint files.

Nothing in here knows about HTTP or torch.
"""
