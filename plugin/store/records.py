"""Records of studies and instances: what C-FIND answers are built from, and each study's filter record.

``ns:study:{uid}`` and ``ns:instance:{uid}`` are hashes of header fields (:mod:`plugin.core.header`)
plus what the workers learnt (state, when indexed). From the merged study hash the study's fixed-width
filter record (:mod:`plugin.store.attributes`) is kept in ``ns:sattr`` under its study number, and every
code slot points at its study's record (``ns:slotsn``): for the image level the study of the
instance, learnt from :meth:`Records.put_instance` or the ``study_uid`` of ``CodeStore.upsert``,
whichever comes first.

Instance states (``state`` in the instance hash), written by the workers: ``indexed``, ``ignored`` (a
non-image object), ``failed`` (in the failure ledger), ``retrying`` (re-queued from the ledger).
``indexed_received_at`` names the reception a state settles: a file received again later is not
settled by an older outcome.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import redis

from plugin.store import scripts
from plugin.store.attributes import (
    ATTR_DTYPE,
    ATTR_SIZE,
    FLAG_KNOWN,
    modality_mask,
    parse_date,
    patient_key,
    split_modalities,
)
from plugin.store.codes import wait_while_compacting
from plugin.store.keys import Keys
from plugin.store.models import LOG_MAXLEN, ModelRegistry

# States in which an instance needs no more work until someone acts ("no-model": stored, counted,
# waiting for a model to be registered for its kind of image; "volume-slice": a slice of a series,
# encoded with a sample of its series when its study is pooled). The workers, the spool's reconciler
# and the backfill read this one set: the reconciler's own, without the last two, queued the slices of
# every CT or MR series again at each start and every 15 minutes, for the worker to call duplicates.
SETTLED_STATES = frozenset({"indexed", "ignored", "failed", "no-model", "volume-slice"})


def _decode(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class Records:
    """Study and instance records. Thread-safe like its client."""

    def __init__(self, client: redis.Redis, keys: Keys, models: ModelRegistry) -> None:
        self.r = client
        self.keys = keys
        self.models = models
        self._link = client.register_script(scripts.LINK_INSTANCE)
        self._study_number = client.register_script(scripts.STUDY_NUMBER)
        self._vocab = client.register_script(scripts.VOCABULARY)
        self._merge = client.register_script(scripts.MERGE_STUDY)

    # -- instances ---------------------------------------------------------------------------------
    def put_instance(self, sop_uid: str, study_uid: str, meta: Mapping[str, str | int | float]) -> bool:
        """Record an instance and link it to its study; True when the instance is new."""
        pipe = self.r.pipeline()
        pipe.hset(self.keys.instance(sop_uid), mapping={"study_uid": study_uid, **{k: str(v) for k, v in meta.items()}})
        pipe.sadd(self.keys.study_instances(study_uid), sop_uid)
        pipe.hdel(self.keys.unindexed(study_uid), sop_uid)  # failed or refused before: recorded now
        _, added, _ = pipe.execute()
        # After the instance hash exists: an image upsert from now on finds the study itself, and
        # one that came before is linked here.
        k = self.keys
        keys = [k.sno(), k.snext()]
        for v in self.models.versions():
            keys += [k.slot(v, "image"), k.slotsn(v, "image"), k.log(v, "image"), k.lock(v, "image")]
        for _ in wait_while_compacting("*/image"):
            if int(self._link(keys=keys, args=[sop_uid, study_uid, LOG_MAXLEN])) >= 0:
                break
        return bool(added)

    def update_instance(
        self, sop_uid: str, fields: Mapping[str, str | int | float], pipe: redis.client.Pipeline | None = None
    ) -> None:
        """Merge fields into an instance record (its state, where its file is...); with ``pipe``, queued
        on the caller's transaction."""
        (self.r if pipe is None else pipe).hset(
            self.keys.instance(sop_uid), mapping={k: str(v) for k, v in fields.items()}
        )

    def instance(self, sop_uid: str) -> dict[str, str]:
        return _decode(self.r.hgetall(self.keys.instance(sop_uid)))

    def instances(self, sop_uids: Sequence[str]) -> list[dict[str, str]]:
        """Records of several instances in one round trip (empty dict for an unknown one)."""
        if not sop_uids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for uid in sop_uids:
            pipe.hgetall(self.keys.instance(uid))
        return [_decode(raw) for raw in pipe.execute()]

    def settled_states(self, sop_uids: Sequence[str]) -> list[tuple[str, float]]:
        """(state, indexed_received_at) of each instance, ("", 0) when it has none; one round trip."""
        if not sop_uids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for uid in sop_uids:
            pipe.hmget(self.keys.instance(uid), ["state", "indexed_received_at"])
        out = []
        for state, when in pipe.execute():
            try:
                at = float(when or 0)
            except ValueError:
                at = 0.0
            out.append(((state or b"").decode(), at))
        return out

    def instances_in_state(self, state: str) -> list[tuple[str, str]]:
        """(sop_uid, study_uid) of every instance in ``state`` (a SCAN: for maintenance jobs)."""
        return [(sop, rec["study_uid"]) for sop, rec in self.instances_in_states((state,))]

    def instances_in_states(
        self, states: Sequence[str], fields: Sequence[str] = ("study_uid",)
    ) -> list[tuple[str, dict[str, str]]]:
        """(sop_uid, {state, and each of ``fields``}) of every instance in one of ``states`` (a SCAN:
        for maintenance jobs such as a re-index choosing what its route takes)."""
        keys = list(self.r.scan_iter(match=self.keys.instance_pattern(), count=2000))
        prefix = self.keys.instance("")
        wanted = {s.encode() for s in states}
        names = ["state", *fields]
        out = []
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            pipe = self.r.pipeline()
            for k in chunk:
                pipe.hmget(k, names)
            for k, values in zip(chunk, pipe.execute(), strict=True):
                if values[0] in wanted:
                    rec = {n: (v or b"").decode() for n, v in zip(names, values, strict=True)}
                    out.append((k.decode()[len(prefix) :], rec))
        return out

    def study_instances(self, study_uid: str) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self.keys.study_instances(study_uid)))

    # -- series (the ones with a series code) -----------------------------------------------------
    def link_series(self, study_uid: str, series_uids: Sequence[str]) -> None:
        """Remember the study of each series given a series code: a series query names only the
        series, and its answers are shown with their studies."""
        if series_uids:
            self.r.hset(self.keys.series(), mapping={s: study_uid for s in series_uids})

    def studies_of_series(self, series_uids: Sequence[str]) -> list[str]:
        """The StudyInstanceUID of each series ("" for a series never pooled), in one round trip."""
        if not series_uids:
            return []
        return [(v or b"").decode() for v in self.r.hmget(self.keys.series(), list(series_uids))]

    # -- studies -----------------------------------------------------------------------------------
    def put_study(self, study_uid: str, meta: Mapping[str, str | int | float]) -> None:
        """Merge ``meta`` into the study hash and refresh the study's filter record from the result.

        The record is computed from the merged hash inside WATCH/MULTI, so two workers writing
        different fields of one study at once cannot leave a record that misses either.
        """
        key = self.keys.study(study_uid)
        if meta:
            self.r.hset(key, mapping={k: str(v) for k, v in meta.items()})
        sn = self.study_number(study_uid)
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    fields = _decode(pipe.hgetall(key))
                    rec = self._attr_record(fields)
                    current = pipe.getrange(self.keys.sattr(), sn * ATTR_SIZE, (sn + 1) * ATTR_SIZE - 1)
                    if current == rec:
                        pipe.unwatch()
                        break
                    pipe.multi()
                    pipe.setrange(self.keys.sattr(), sn * ATTR_SIZE, rec)
                    pipe.xadd(self.keys.attrlog(), {"sn": sn, "rec": rec}, maxlen=LOG_MAXLEN, approximate=True)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        accession = (fields.get("accession_number") or "").strip()
        if accession:
            self.r.sadd(self.keys.accession(accession), study_uid)

    def studies_by_accession(self, accession: str) -> list[tuple[str, dict[str, str]]]:
        """(StudyInstanceUID, record) of the studies whose AccessionNumber is ``accession`` now."""
        uids = sorted(m.decode() for m in self.r.smembers(self.keys.accession(accession.strip())))
        return [
            (u, s)
            for u, s in zip(uids, self.studies(uids), strict=True)
            if s.get("accession_number") == accession.strip()
        ]

    def merge_instance_into_study(
        self, study_uid: str, modality: str, received_at: float, meta: Mapping[str, str]
    ) -> None:
        """Add one indexed instance's study-level fields to its study (concurrent workers safe).

        The modality joins the study's sorted modality list and the latest arrival time is kept, in
        one script, so two workers on one study cannot lose each other's update; then the filter
        record is refreshed from the merged hash.
        """
        args: list[Any] = [modality, repr(float(received_at))]
        for k, v in meta.items():
            args += [k, str(v)]
        self._merge(keys=[self.keys.study(study_uid), self.keys.study_instances(study_uid)], args=args)
        self.put_study(study_uid, {})

    def record_pooling(self, study_uid: str, version: str, n_instances: int, started: float, at: float) -> None:
        fields = {f"pooled_n:{version}": n_instances, f"pooled_at:{version}": at, f"pool_started:{version}": started}
        self.r.hset(self.keys.study(study_uid), mapping=fields)

    def pool_started(self, study_uid: str, version: str) -> float:
        """When the last pooling of the study with ``version`` started (0: never)."""
        return float(self.r.hget(self.keys.study(study_uid), f"pool_started:{version}") or 0)

    def _attr_record(self, fields: Mapping[str, str]) -> bytes:
        rec = np.zeros(1, ATTR_DTYPE)
        rec["flags"] = FLAG_KNOWN
        rec["date"] = parse_date(fields.get("study_date"))
        rec["patient"] = patient_key(fields.get("patient_id"))
        mods = split_modalities(fields.get("modalities"))
        if mods:
            rec["modmask"] = modality_mask(list(self._vocab(keys=[self.keys.vocab("modality")], args=mods)))
        body = (fields.get("body_part") or "").strip().upper()
        if body:
            (number,) = self._vocab(keys=[self.keys.vocab("body_part")], args=[body])
            rec["body"] = min(int(number), 0xFFFF)
        return rec.tobytes()

    def study(self, study_uid: str) -> dict[str, str]:
        return _decode(self.r.hgetall(self.keys.study(study_uid)))

    def study_uids(self) -> list[str]:
        """Every stored study (each study ever numbered whose record still exists): for maintenance
        that visits the whole archive, such as ``drh-pacs repool``."""
        numbered = [uid.decode() for uid, _ in self.r.hscan_iter(self.keys.sno(), count=5000)]
        out = []
        for start in range(0, len(numbered), 1000):
            chunk = numbered[start : start + 1000]
            pipe = self.r.pipeline(transaction=False)
            for uid in chunk:
                pipe.exists(self.keys.study(uid))
            out.extend(uid for uid, exists in zip(chunk, pipe.execute(), strict=True) if exists)
        return out

    def studies(self, study_uids: Sequence[str]) -> list[dict[str, str]]:
        """Metadata of several studies in one round trip (empty dict for an unknown study).

        Each known study carries ``n_instances``; records written before that field existed get it
        from their instance set (one more pipelined round trip, only for those).
        """
        if not study_uids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for uid in study_uids:
            pipe.hgetall(self.keys.study(uid))
        studies = [_decode(raw) for raw in pipe.execute()]
        missing = [n for n, s in enumerate(studies) if s and not s.get("n_instances")]
        if missing:
            pipe = self.r.pipeline(transaction=False)
            for n in missing:
                pipe.scard(self.keys.study_instances(study_uids[n]))
            for n, count in zip(missing, pipe.execute(), strict=True):
                studies[n]["n_instances"] = str(count)
        return studies

    def iter_study_uids(self) -> Iterator[str]:
        """Every study with metadata (SCAN, so a large archive does not block Redis)."""
        for key in self.r.scan_iter(match=self.keys.study_pattern(), count=1000):
            uid = self.keys.study_uid_of(key.decode() if isinstance(key, bytes) else key)
            if uid is not None:
                yield uid

    def studies_with_instances(
        self, study_uids: Iterable[str], with_instances: bool, batch: int = 500
    ) -> Iterator[tuple[str, dict[str, str], list[dict[str, str]]]]:
        """(uid, metadata, instances) of each study that has metadata, for plain Query/Retrieve.

        Pipelined by ``batch`` studies, so a plain query over a large archive is a few round trips per
        thousand studies rather than several per study. An instance's dict carries ``sop_uid`` besides
        its record's fields (only ``sop_uid`` without ``with_instances``).
        """
        pending: list[str] = []
        for uid in study_uids:
            pending.append(uid)
            if len(pending) >= batch:
                yield from self._studies_batch(pending, with_instances)
                pending = []
        if pending:
            yield from self._studies_batch(pending, with_instances)

    def _studies_batch(
        self, uids: list[str], with_instances: bool
    ) -> Iterator[tuple[str, dict[str, str], list[dict[str, str]]]]:
        pipe = self.r.pipeline(transaction=False)
        for uid in uids:
            pipe.hgetall(self.keys.study(uid))
            pipe.smembers(self.keys.study_instances(uid))
        raw = pipe.execute()
        rows = []
        for n, uid in enumerate(uids):
            study = _decode(raw[2 * n])
            if study:
                rows.append((uid, study, sorted(m.decode() for m in raw[2 * n + 1])))
        sop_meta: dict[str, dict[str, str]] = {}
        if with_instances:
            all_sops = [sop for _, _, sops in rows for sop in sops]
            sop_meta = dict(zip(all_sops, self.instances(all_sops), strict=True))
        for uid, study, sops in rows:
            yield uid, study, [{"sop_uid": sop, **sop_meta.get(sop, {})} for sop in sops]

    # -- study numbers and vocabularies ------------------------------------------------------------
    def study_number(self, study_uid: str) -> int:
        return int(self._study_number(keys=[self.keys.sno(), self.keys.snext()], args=[study_uid]))

    def vocabulary(self, field: str, terms: Iterable[str]) -> list[int | None]:
        """Numbers of terms in a filter vocabulary (``modality``, ``body_part``); None if never seen."""
        terms = list(terms)
        if not terms:
            return []
        raw = self.r.hmget(self.keys.vocab(field), terms)
        return [None if v is None else int(v) for v in raw]

    def note_unindexed(
        self, study_uid: str, sop_uid: str, outcome: str, pipe: redis.client.Pipeline | None = None
    ) -> None:
        """An instance of the study settled without an index (``failed``, ``ignored``, ``refused``);
        with ``pipe``, queued on the caller's transaction."""
        if study_uid:
            (pipe or self.r).hset(self.keys.unindexed(study_uid), sop_uid, outcome)

    def unindexed(self, study_uid: str) -> dict[str, int]:
        """How many of the study's instances were settled without an index, by outcome."""
        counts: dict[str, int] = {}
        for outcome in self.r.hvals(self.keys.unindexed(study_uid)):
            counts[outcome.decode()] = counts.get(outcome.decode(), 0) + 1
        return counts

    # -- deletion ----------------------------------------------------------------------------------
    def delete_study(self, study_uid: str, sop_uids: Sequence[str]) -> None:
        """Drop the study's and its instances' records and blank its filter record (replicas follow)."""
        accession = (self.study(study_uid).get("accession_number") or "").strip()
        series = {s for s in (r.get("series_uid") for r in self.instances(sop_uids)) if s}
        pipe = self.r.pipeline(transaction=True)
        for sop in sop_uids:
            pipe.delete(self.keys.instance(sop))
        if series:
            pipe.hdel(self.keys.series(), *series)
        pipe.delete(self.keys.study(study_uid), self.keys.study_instances(study_uid), self.keys.unindexed(study_uid))
        if accession:
            pipe.srem(self.keys.accession(accession), study_uid)
        pipe.execute()
        sn = self.r.hget(self.keys.sno(), study_uid)
        if sn is not None:
            blank = bytes(ATTR_SIZE)
            pipe = self.r.pipeline(transaction=True)
            pipe.setrange(self.keys.sattr(), int(sn) * ATTR_SIZE, blank)
            pipe.xadd(self.keys.attrlog(), {"sn": int(sn), "rec": blank}, maxlen=LOG_MAXLEN, approximate=True)
            pipe.execute()
