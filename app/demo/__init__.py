"""Simulated agents for ``datadiet demo`` and the quality benchmark: tasks, sources and scenarios."""
