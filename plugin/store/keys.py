"""Every Redis key drh-pacs writes or reads: the one place a key name is spelled.

This docstring is the schema. ``ns`` is ``Settings.redis_namespace`` (one Redis can host several
installations), ``v`` a model version, ``lv`` a level (``image`` for DRH instance codes, ``series``
and ``study`` for DMIH codes pooled over a series' or a study's images). The owning module of each
group says how the values are kept consistent.

Codes (:mod:`plugin.store.codes`, :mod:`plugin.store.models`)

==========================================  =======  =================================================
``ns:routes``                               hash     route name -> the model version that answers
                                                     for the route (one per route, all at once)
``ns:model:active``                         string   before routes: the one answering version (read
                                                     once, moved into ``ns:routes``)
``ns:model:{v}``                            hash     nbits, created, state (building|complete), path,
                                                     emb_dim, route (name), route_spec (JSON of
                                                     :class:`hashing.route.Route`)
``ns:models``                               set      every registered model version
``ns:codes:{v}:{lv}``                       string   fixed-width slots of ``nbits // 8`` bytes; slot
                                                     ``s`` is bytes ``[s*B, (s+1)*B)``
``ns:next:{v}:{lv}``                        string   slot counter (INCR: allocation is atomic)
``ns:slot:{v}:{lv}``                        hash     uid -> slot (StudyInstanceUID or SOPInstanceUID)
``ns:uid:{v}:{lv}``                         hash     slot -> uid
``ns:tomb:{v}:{lv}``                        string   bitmap, bit ``s`` set = slot ``s`` deleted
``ns:log:{v}:{lv}``                         stream   change log (op=init|set|del|link) that replicas
                                                     follow incrementally
``ns:gen:{v}:{lv}``                         string   generation; bumped by compaction (slots
                                                     renumbered, replicas must reload)
``ns:lock:{v}:{lv}``                        string   held (with a TTL) while compaction runs
``ns:slotsn:{v}:{lv}``                      string   per slot, uint32 LE: the slot's study number
``ns:rr:{v}:{lv}``                          string   per slot, ``nbits`` int8: the relaxed code that
                                                     re-ranks a Hamming shortlist (zeros: none)
``ns:emb:{v}``                              hash     SOPInstanceUID -> float16 instance embedding
``ns:var:{v}``                              hash     SOPInstanceUID -> int8 re-ranking vectors of the
                                                     instance's query variants (hashing.variants)
==========================================  =======  =================================================

Records of studies and instances (:mod:`plugin.store.records`)

==========================================  =======  =================================================
``ns:study:{uid}``                          hash     study metadata for C-FIND answers and filters
``ns:study:{uid}:instances``                set      SOPInstanceUIDs received for the study
``ns:unindexed:{study}``                    hash     SOPInstanceUID -> failed|ignored|refused: the
                                                     study's instances received and settled without
                                                     an index (a query on a study none of whose images
                                                     could be indexed says so, not "unknown")
``ns:accession:{number}``                   set      StudyInstanceUIDs with that AccessionNumber (viewer
                                                     forms name a study by it; not unique everywhere)
``ns:series``                                hash     SeriesInstanceUID -> StudyInstanceUID, for the
                                                     series that have a series code (written when the
                                                     study is pooled)
``ns:instance:{uid}``                       hash     study_uid, series_uid, sop_class_uid, modality,
                                                     body_part, photometric, route, path,
                                                     received_at, state (indexed|ignored|failed|
                                                     no-model|volume-slice|...), indexed_* fields;
                                                     volume=1 and represented_by (the sampled slice
                                                     answering for it) for slices of a volume
``ns:sno``                                  hash     StudyInstanceUID -> study number (1, 2, ...)
``ns:snext``                                string   study number counter (INCR)
``ns:sattr``                                string   per study number, a 24-byte filter record
                                                     (:data:`plugin.store.attributes.ATTR_DTYPE`)
``ns:attrlog``                              stream   (sn, rec): study records as they change
``ns:vocab:{field}``                        hash     modality / body_part -> small number
==========================================  =======  =================================================

Work in progress (:mod:`plugin.store.ingest`, :mod:`plugin.store.reindex`, :mod:`plugin.store.backfill`)

==========================================  =======  =================================================
``ns:ingest:pending``                       zset     SOPInstanceUID by reception time: instances
                                                     queued for the model, a batching hint
``ns:ingest:payload``                       hash     SOPInstanceUID -> JSON task payload
``ns:ingest:claim``                         hash     SOPInstanceUID -> "deadline|task id" lease
``ns:ingest:decoding``                      hash     SOPInstanceUID -> decodes started, not finished
``ns:ingest:queued-at:{study}``             zset     SOPInstanceUID by reception time: the study's
                                                     instances received and not yet settled (its
                                                     pooling waits for them). The previous release
                                                     kept a set, ``ns:ingest:queued:{study}``,
                                                     moved in when the study is next looked at
``ns:pool:due``                             zset     StudyInstanceUID by the time it is stable (its
                                                     last instance + study_stable_seconds): studies
                                                     to pool; a late instance moves it later
``ns:pool:running``                         zset     StudyInstanceUID by the end of its pooling's
                                                     lease: claimed by a worker's scan, due again if
                                                     the lease runs out
``ns:reindex``                              hash     the re-index job: version, path, previous, state,
                                                     started, finished, total, done, failed, planned
``ns:reindex:done``                         set      SOPInstanceUIDs re-encoded
``ns:reindex:failed``                       hash     SOPInstanceUID -> reason
``ns:backfill:orthanc:{url id}``            hash     url, source_ae, last_run, done, finished
``ns:backfill:orthanc:{url id}:done``       set      Orthanc study IDs already backfilled
==========================================  =======  =================================================

Outcomes and operations (:mod:`plugin.store.ledger`, :mod:`plugin.store.stats`,
:mod:`plugin.store.heartbeats`)

==========================================  =======  =================================================
``ns:failures``                             hash     SOPInstanceUID -> JSON failure entry
``ns:failures:recent``                      zset     SOPInstanceUID by last failure time
``ns:ignored``                              hash     SOPInstanceUID -> JSON {reason, study_uid, when}
``ns:refused``                              hash     SOPInstanceUID -> JSON C-STORE refusal {reason,
                                                     status, study_uid, source_ae, first_seen,
                                                     last_seen, count}
``ns:refused:recent``                       zset     SOPInstanceUID by last refusal time
``ns:stats:tasks``                          hash     ``<task>:<outcome>`` -> count
``ns:stats:latency``                        hash     C-STORE-to-searchable histogram buckets
``ns:stats:nomodel``                        hash     modality -> images stored without a model (no
                                                     route takes them and ``unrouted`` is ``none``)
``ns:stats:bymodality``                     hash     ``<outcome>|<modality>`` -> instances indexed,
                                                     failed, ignored, stored without a model
``ns:workers``                              hash     worker hostname -> JSON heartbeat
``ns:workerprocs``                          hash     "hostname|pid|model" -> JSON {device, model, loaded}
==========================================  =======  =================================================

The broker's own keys are Celery's (kombu's Redis transport): a list per queue (and per priority),
and ``unacked``; :meth:`Keys.queue_lists` and :meth:`Keys.unacked` name the ones the status reads.
"""

from __future__ import annotations

# Kombu's Redis transport keeps priorities 3, 6 and 9 in separate lists next to the plain one.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class Keys:
    """Key names of one namespace; every other module asks here."""

    def __init__(self, namespace: str = "drh") -> None:
        self.ns = namespace

    # -- models and codes --------------------------------------------------------------------------
    def active(self) -> str:
        return f"{self.ns}:model:active"

    def routes(self) -> str:
        return f"{self.ns}:routes"

    def model(self, v: str) -> str:
        return f"{self.ns}:model:{v}"

    def models(self) -> str:
        return f"{self.ns}:models"

    def codes(self, v: str, lv: str) -> str:
        return f"{self.ns}:codes:{v}:{lv}"

    def next(self, v: str, lv: str) -> str:
        return f"{self.ns}:next:{v}:{lv}"

    def slot(self, v: str, lv: str) -> str:
        return f"{self.ns}:slot:{v}:{lv}"

    def uid(self, v: str, lv: str) -> str:
        return f"{self.ns}:uid:{v}:{lv}"

    def tomb(self, v: str, lv: str) -> str:
        return f"{self.ns}:tomb:{v}:{lv}"

    def log(self, v: str, lv: str) -> str:
        return f"{self.ns}:log:{v}:{lv}"

    def gen(self, v: str, lv: str) -> str:
        return f"{self.ns}:gen:{v}:{lv}"

    def lock(self, v: str, lv: str) -> str:
        return f"{self.ns}:lock:{v}:{lv}"

    def slotsn(self, v: str, lv: str) -> str:
        return f"{self.ns}:slotsn:{v}:{lv}"

    def rerank(self, v: str, lv: str) -> str:
        return f"{self.ns}:rr:{v}:{lv}"

    def code_keys(self, v: str, lv: str) -> list[str]:
        """Every key of one (version, level): what dropping a version removes."""
        return [
            self.codes(v, lv),
            self.next(v, lv),
            self.slot(v, lv),
            self.uid(v, lv),
            self.tomb(v, lv),
            self.log(v, lv),
            self.gen(v, lv),
            self.lock(v, lv),
            self.slotsn(v, lv),
            self.rerank(v, lv),
        ]

    def emb(self, v: str) -> str:
        return f"{self.ns}:emb:{v}"

    def variants(self, v: str) -> str:
        return f"{self.ns}:var:{v}"

    # -- records -----------------------------------------------------------------------------------
    def study(self, uid: str) -> str:
        return f"{self.ns}:study:{uid}"

    def study_pattern(self) -> str:
        """SCAN pattern over study hashes (it also matches ``:instances`` sets, see :meth:`study_uid_of`)."""
        return f"{self.ns}:study:*"

    def study_uid_of(self, key: str) -> str | None:
        """The StudyInstanceUID of a study hash key, None for other keys the pattern matches."""
        prefix = self.study("")
        uid = key[len(prefix) :] if key.startswith(prefix) else ""
        return uid if uid and ":" not in uid else None

    def study_instances(self, uid: str) -> str:
        return f"{self.ns}:study:{uid}:instances"

    def accession(self, number: str) -> str:
        return f"{self.ns}:accession:{number}"

    def series(self) -> str:
        return f"{self.ns}:series"

    def unindexed(self, study_uid: str) -> str:
        return f"{self.ns}:unindexed:{study_uid}"

    def instance(self, uid: str) -> str:
        return f"{self.ns}:instance:{uid}"

    def instance_pattern(self) -> str:
        return f"{self.ns}:instance:*"

    def sno(self) -> str:
        return f"{self.ns}:sno"

    def snext(self) -> str:
        return f"{self.ns}:snext"

    def sattr(self) -> str:
        return f"{self.ns}:sattr"

    def attrlog(self) -> str:
        return f"{self.ns}:attrlog"

    def vocab(self, field: str) -> str:
        return f"{self.ns}:vocab:{field}"

    # -- work in progress --------------------------------------------------------------------------
    def ingest_pending(self) -> str:
        return f"{self.ns}:ingest:pending"

    def ingest_payload(self) -> str:
        return f"{self.ns}:ingest:payload"

    def ingest_claim(self) -> str:
        return f"{self.ns}:ingest:claim"

    def ingest_decoding(self) -> str:
        return f"{self.ns}:ingest:decoding"

    def ingest_queued(self, study_uid: str) -> str:
        return f"{self.ns}:ingest:queued-at:{study_uid}"

    def ingest_queued_before(self, study_uid: str) -> str:
        """The previous release's set of the study's queued instances (no reception times)."""
        return f"{self.ns}:ingest:queued:{study_uid}"

    def pool_due(self) -> str:
        return f"{self.ns}:pool:due"

    def pool_running(self) -> str:
        return f"{self.ns}:pool:running"

    def nomodel(self) -> str:
        return f"{self.ns}:stats:nomodel"

    def bymodality(self) -> str:
        return f"{self.ns}:stats:bymodality"

    def reindex(self) -> str:
        return f"{self.ns}:reindex"

    def reindex_done(self) -> str:
        return f"{self.ns}:reindex:done"

    def reindex_failed(self) -> str:
        return f"{self.ns}:reindex:failed"

    def backfill(self, url_id: str) -> str:
        return f"{self.ns}:backfill:orthanc:{url_id}"

    def backfill_done(self, url_id: str) -> str:
        return f"{self.ns}:backfill:orthanc:{url_id}:done"

    # -- outcomes and operations -------------------------------------------------------------------
    def failures(self) -> str:
        return f"{self.ns}:failures"

    def failures_recent(self) -> str:
        return f"{self.ns}:failures:recent"

    def ignored(self) -> str:
        return f"{self.ns}:ignored"

    def refused(self) -> str:
        return f"{self.ns}:refused"

    def refused_recent(self) -> str:
        return f"{self.ns}:refused:recent"

    def stats_tasks(self) -> str:
        return f"{self.ns}:stats:tasks"

    def stats_latency(self) -> str:
        return f"{self.ns}:stats:latency"

    def workers(self) -> str:
        return f"{self.ns}:workers"

    def worker_procs(self) -> str:
        return f"{self.ns}:workerprocs"

    # -- the broker's (kombu's) keys, read by the status -------------------------------------------
    @staticmethod
    def queue_lists(queue: str) -> list[str]:
        """The lists kombu keeps for one queue: the plain one and one per priority."""
        return [queue + suffix for suffix in _PRIORITY_SUFFIXES]

    @staticmethod
    def unacked() -> str:
        """Kombu's hash of delivered, not yet acknowledged messages (in flight)."""
        return "unacked"
