"""Everything datadiet persists: the Redis sample buffer, SQL metadata and checkpoint files, and the
processes that hold them (store/processes.py: starting a redis-server or the API, shared by ``datadiet
up``, the benchmarks and the tests).

Nothing in here imports torch, FastAPI or the trainer; processes.py asks ``/readyz`` over plain HTTP.
"""
