"""What the status reads from the Celery broker (a Redis, often the store's): queue depths, in flight.

The key names are kombu's (:meth:`plugin.store.keys.Keys.queue_lists`), not ours; reading them here
keeps every Redis key in the store package.
"""

from __future__ import annotations

import redis

from plugin.store.keys import Keys


def broker_client(broker_url: str, store_client: redis.Redis) -> redis.Redis:
    """The broker's Redis: its own (``Settings.broker_url``, with a timeout, so that a reader never
    hangs on a broker that is away), or the store's when it has none."""
    return redis.Redis.from_url(broker_url, socket_timeout=5) if broker_url else store_client


def queue_depth(broker: redis.Redis, queue: str) -> int:
    """Messages waiting in one Celery queue, every priority included."""
    pipe = broker.pipeline()
    for key in Keys.queue_lists(queue):
        pipe.llen(key)
    return int(sum(pipe.execute()))


def in_flight(broker: redis.Redis) -> int:
    """Messages delivered to workers and not yet acknowledged."""
    return int(broker.hlen(Keys.unacked()))
