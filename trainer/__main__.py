"""Run the trainer: ``datadiet train`` or ``python -m trainer``.

python -m trainer                                        # embedded Redis + SQLite under ./datadiet-data
DATADIET_MAX_STEPS=2000 DATADIET_REWEIGHT=uniform python -m trainer   # the baseline, stopping at 2000
DATADIET_MODEL=mlp DATADIET_MODEL_CONFIG='{"n_features": 64, "n_classes": 10}' python -m trainer
DATADIET_REDIS_URL=redis://host:6379/0 DATADIET_DATABASE_URL=postgresql://... python -m trainer
torchrun --standalone --nproc-per-node 2 -m trainer     # data-parallel ranks (trainer/distributed.py)
DATADIET_REDIS_URL=redis+cluster://host:7000 python -m trainer        # a Redis Cluster (any node)

One trainer trains a deployment at a time: a second one waits for the first's lease (store/lease.py), or
exits with status 75 under DATADIET_LEASE_WAIT=false. Redis and database outages are waited out. A model
that cannot be built (a missing model path, an unknown config key, an extra not installed) is one log line
and exit status 78, as is a database schema behind this code's under DATADIET_AUTO_MIGRATE=false (run
`datadiet migrate`), or a DATADIET_REDIS_URL no client takes (store/redis_client.py). Logs:
DATADIET_LOG_FORMAT=json for JSON lines (app/logs.py).
"""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError
from redis.exceptions import RedisClusterException

from app.logs import setup_logging
from store.config import configuration_error
from store.embedded import resolve_redis_url
from store.feed import TrainerFeed
from store.keys import ShardsMismatch
from store.meta import SchemaNotCurrent, check_schema, make_engine, migrate
from store.redis_client import UNAVAILABLE_ERRORS, BadRedisURL, sync_client
from trainer import distributed
from trainer.loop import Trainer
from trainer.models.base import ModelNotFound
from trainer.outage import DATABASE_ERRORS, Dependency
from trainer.settings import TrainerSettings

# RedisClusterException: "Redis Cluster cannot be connected" (no node the URL names answers)
CONNECT_ERRORS = (*UNAVAILABLE_ERRORS, RedisClusterException)
EXIT_CONFIG = 78  # EX_CONFIG: the model cannot be built from its settings (a missing path, a bad key)


def main() -> int:
    try:
        settings = TrainerSettings()
    except ValidationError as e:  # a DATADIET_* value that cannot be used: said as the variable, exit 78
        print(configuration_error(e) or e, file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_format)
    ranks = None
    if distributed.world_size() > 1:  # under torchrun: rank 0 runs the trainer, the others train shards
        try:
            ranks = distributed.start(settings)
        except distributed.RanksError as e:
            logging.getLogger("datadiet.trainer").error("%s", e)
            return EXIT_CONFIG
        if ranks.rank > 0:
            return distributed.serve(settings, ranks)
    settings.ensure_data_dir()
    try:
        url, embedded = resolve_redis_url(settings.redis_url, settings.data_dir)
    except BadRedisURL as e:  # a scheme no client takes, a cluster URL with a database
        logging.getLogger("datadiet.trainer").error("%s", e)
        return EXIT_CONFIG
    engine = make_engine(settings.resolved_database_url)
    try:
        # a database that is down at start is waited for (with backoff), never a reason to exit
        try:
            Dependency("database", DATABASE_ERRORS, max_delay_s=settings.max_backoff_s).wait_for(
                lambda: migrate(engine) if settings.auto_migrate else check_schema(engine)
            )
        except SchemaNotCurrent as e:  # DATADIET_AUTO_MIGRATE=false and `datadiet migrate` has not run
            logging.getLogger("datadiet.trainer").error("%s", e)
            return EXIT_CONFIG
        # a hung Redis fails a call after 10 s (the longest blocking read is 1 s) instead of holding it;
        # a cluster client reads the slot map as it is made, so an unreachable cluster is waited for here
        _, client = Dependency("redis", CONNECT_ERRORS, max_delay_s=settings.max_backoff_s).wait_for(
            lambda: sync_client(url, socket_timeout=10, socket_connect_timeout=5)
        )
        assert client is not None  # wait_for returns only once it succeeded (nothing stops it here)
        feed = TrainerFeed(client, settings.keys, settings.consumer, settings.lease_ttl_s)
        try:
            trainer = Trainer(settings, feed, engine, learner=distributed.learner_for(ranks))
        except (ModelNotFound, ImportError, ValueError) as e:  # DATADIET_MODEL / DATADIET_MODEL_CONFIG
            logging.getLogger("datadiet.trainer").error("cannot build the %r model: %s", settings.model, e)
            return EXIT_CONFIG
        try:
            return trainer.run()
        except ShardsMismatch as e:  # the API wrote the buffer with another DATADIET_BUFFER_SHARDS
            logging.getLogger("datadiet.trainer").error("%s", e)
            return EXIT_CONFIG
    finally:
        if ranks is not None:
            ranks.finish()
        engine.dispose()
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
