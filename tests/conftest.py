"""Shared fixtures: a real Redis server per test session, a clean database per test, free ports,
a Store on it, and real worker processes on demand. Helpers that are not fixtures live in
``tests/helpers/``.

Markers: ``slow`` for tests that start processes (workers, ``serve``, Orthanc, DCMTK peers,
deployment tools) or train models; ``pytest -m "not slow"`` is the quick subset (README, Development).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from plugin.core.redis_server import EmbeddedRedis, free_port
from plugin.store import Store
from tests.helpers.workers import NS, WorkerProc, worker_env


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One real redis-server for the session; tests isolate themselves with ``redis_client``."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client on a clean database (FLUSHALL before each test)."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def store(redis_client: redis.Redis) -> Store:
    """The store of the default namespace on the clean database."""
    return Store(redis_client, NS)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def worker_factory(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Callable[..., WorkerProc]]:
    """Start `drh-pacs worker` processes on demand; every one is stopped at the end of the test."""
    started: list[WorkerProc] = []

    def start(name: str = "test", **extra: str) -> WorkerProc:
        env = worker_env(redis_server.url, tmp_path / "data", **extra)
        w = WorkerProc(env, tmp_path / f"worker-{name}-{len(started)}.log", name).start(redis_client)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
        print(f"--- {w.log_path.name} ---\n{w.log()[-6000:]}")  # shown by pytest when the test failed
