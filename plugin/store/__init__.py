"""The Redis store: the only package that spells a Redis key (:mod:`plugin.store.keys` is the schema).

:class:`Store` bundles one client's views of the data, each in its own module:

- ``models`` (:mod:`~plugin.store.models`): registered model versions and the active one;
- ``codes`` (:mod:`~plugin.store.codes`): binary codes per (version, level), change logs, compaction;
- ``records`` (:mod:`~plugin.store.records`): study and instance records, study filter records;
- ``embeddings`` (:mod:`~plugin.store.embeddings`): float instance embeddings for DMIH pooling;
- ``ledger`` (:mod:`~plugin.store.ledger`): failed and ignored instances;
- ``ingest`` (:mod:`~plugin.store.ingest`): batching hints, claims, decode crash counts, pool markers;
- ``reindex`` (:mod:`~plugin.store.reindex`): the re-index job's state;
- ``stats`` (:mod:`~plugin.store.stats`): task outcome counters, ingest latency histogram;
- ``workers`` (:mod:`~plugin.store.heartbeats`): worker heartbeats and their devices.

It speaks Redis and nothing else: no DICOM, no HTTP, no Celery.
"""

from __future__ import annotations

import redis

from plugin.store.attributes import ATTR_DTYPE, FLAG_KNOWN, MODALITY_BITS, parse_date, patient_key
from plugin.store.backfill import BackfillProgress
from plugin.store.codes import UID_WIDTH, Changes, CodeStore, Snapshot
from plugin.store.embeddings import Embeddings
from plugin.store.heartbeats import HEARTBEAT_SECONDS, WorkerRegistry, worker_state
from plugin.store.ingest import IngestState
from plugin.store.keys import Keys
from plugin.store.ledger import FailureLedger
from plugin.store.models import LEVELS, ModelInfo, ModelRegistry, StoreError
from plugin.store.records import SETTLED_STATES, Records
from plugin.store.reindex import ACTIVE_STATES, ReindexJob
from plugin.store.stats import Stats

__all__ = [
    "ACTIVE_STATES",
    "ATTR_DTYPE",
    "FLAG_KNOWN",
    "HEARTBEAT_SECONDS",
    "LEVELS",
    "MODALITY_BITS",
    "SETTLED_STATES",
    "UID_WIDTH",
    "Changes",
    "ModelInfo",
    "Snapshot",
    "Store",
    "StoreError",
    "parse_date",
    "patient_key",
    "worker_state",
]


class Store:
    """Every view of one Redis client and namespace. One per process; thread-safe like its client."""

    def __init__(self, client: redis.Redis, namespace: str = "drh") -> None:
        self.client = client
        self.keys = Keys(namespace)
        self.models = ModelRegistry(client, self.keys)
        self.codes = CodeStore(client, self.keys, self.models)
        self.records = Records(client, self.keys, self.models)
        self.embeddings = Embeddings(client, self.keys)
        self.ledger = FailureLedger(client, self.keys)
        self.ingest = IngestState(client, self.keys)
        self.reindex = ReindexJob(client, self.keys)
        self.stats = Stats(client, self.keys)
        self.workers = WorkerRegistry(client, self.keys)

    @classmethod
    def from_url(cls, url: str, namespace: str = "drh", **client_options: object) -> Store:
        return cls(redis.Redis.from_url(url, **client_options), namespace)  # type: ignore[arg-type]

    @property
    def namespace(self) -> str:
        return self.keys.ns

    def ping(self) -> bool:
        return bool(self.client.ping())

    def close(self) -> None:
        self.client.close()

    def backfill(self, url: str) -> BackfillProgress:
        return BackfillProgress(self.client, self.keys, url)

    def delete_study(self, study_uid: str) -> int:
        """Remove a study everywhere (a retracted or misfiled study, an erasure request).

        Tombstones its study code, its series' codes and its instances' image codes in every model
        version, drops their embeddings, failure-ledger entries, the instance records and the study's
        metadata, and blanks its filter record. Returns the number of codes deleted. Replicas follow
        through the change logs.
        """
        sops = self.records.study_instances(study_uid)
        series = sorted({r.get("series_uid", "") for r in self.records.instances(sops)} - {""})
        removed = 0
        for v in self.models.versions():
            removed += self.codes.delete(v, "study", study_uid) is not None
            for uid in series:
                removed += self.codes.delete(v, "series", uid) is not None
            for sop in sops:
                removed += self.codes.delete(v, "image", sop) is not None
            self.embeddings.delete(v, sops)
        for sop in sops:
            self.ledger.resolve(sop)
        self.records.delete_study(study_uid, sops)
        return int(removed)
