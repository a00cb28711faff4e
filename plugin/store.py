"""The Redis store of codes and study metadata.

Key layout (``ns`` is ``Settings.redis_namespace``, ``v`` a model version, ``lv`` a level: ``image``
for DRH instance codes, ``study`` for DMIH study codes). This docstring is the reference for it.

==========================================  =======  =================================================
key                                         type     content
==========================================  =======  =================================================
``ns:model:active``                         string   the model version that answers queries
``ns:model:{v}``                            hash     nbits, created, state (building|complete), ...
``ns:codes:{v}:{lv}``                       string   fixed-width slots of ``nbits // 8`` bytes; slot
                                                     ``s`` is bytes ``[s*B, (s+1)*B)``
``ns:next:{v}:{lv}``                        string   slot counter (INCR: allocation is atomic, safe with
                                                     any number of workers)
``ns:slot:{v}:{lv}``                        hash     uid -> slot (StudyInstanceUID or SOPInstanceUID)
``ns:uid:{v}:{lv}``                         hash     slot -> uid
``ns:tomb:{v}:{lv}``                        string   bitmap, bit ``s`` set = slot ``s`` deleted
``ns:log:{v}:{lv}``                         stream   change log (op=set|del, slot, uid) that replicas
                                                     follow incrementally
``ns:gen:{v}:{lv}``                         string   generation; bumped by compaction (slots renumbered,
                                                     replicas must reload)
``ns:lock:{v}:{lv}``                        string   held (with a TTL) while compaction runs; writes to
                                                     that (version, level) wait for it
``ns:emb:{v}``                              hash     SOPInstanceUID -> float16 instance embedding
                                                     (input of the DMIH study pooling)
``ns:study:{uid}``                          hash     study metadata for C-FIND answers and filters
``ns:study:{uid}:instances``                set      SOPInstanceUIDs received for the study
``ns:instance:{uid}``                       hash     study_uid, series_uid, sop_class_uid, modality,
                                                     path (file kept on disk), received_at
``ns:models``                               set      every registered model version
``ns:slotsn:{v}:{lv}``                      string   per slot, uint32 little-endian: the study number of
                                                     the slot's study (0 = not known yet)
``ns:sno``                                  hash     StudyInstanceUID -> study number (1, 2, ...)
``ns:snext``                                string   study number counter (INCR)
``ns:sattr``                                string   per study number, a 24-byte record of the
                                                     attributes filters need (:data:`ATTR_DTYPE`)
``ns:attrlog``                              stream   (sn, rec): study records as they change
``ns:vocab:modality``                       hash     modality -> bit number in ``modmask`` (0..63)
``ns:vocab:body_part``                      hash     BodyPartExamined -> id (1..65535)
==========================================  =======  =================================================

Upserts are idempotent by UID: writing the same UID again reuses its slot, and writing the same
code again changes nothing and logs nothing. A deleted UID's slot is tombstoned (never reused until
:meth:`CodeStore.compact` renumbers the live slots, keeping their order, and bumps the generation).

Why the compact attribute records: a replica of a million studies must load, and filter, without
reading a million hashes. ``put_study`` keeps the ``ns:study:{uid}`` hash (what C-FIND answers are
built from) and, from the merged hash, the study's fixed-width record in ``ns:sattr``; each code slot
points at its study's record through ``ns:slotsn`` (for the image level, the study of the instance,
learnt from ``put_instance`` or the ``study_uid`` argument of ``upsert_code``, whichever comes first).
The record holds StudyDate as an integer, the modalities as a bitmask over a small vocabulary, the
body part as an id and the PatientID as a 64-bit BLAKE2b hash: fixed width, and no readable ID in
the replica's memory or a core dump (a pseudonym, not anonymisation: an ID space can be searched).
Two patients collide with probability about 2**-64 per pair.

Change logs. Every write that a replica must see appends to a stream, in the same Lua script or
transaction as the write: ``set`` (slot, uid, code, sn), ``del`` (slot, uid), ``link`` (slot, sn) to
``ns:log:{v}:{lv}``, and (sn, rec) to ``ns:attrlog``. A replica loads one consistent snapshot (one
MULTI) with the last entry id of each stream, then applies the entries after it. Streams are capped
near :data:`LOG_MAXLEN` entries; a replica that finds its last entry trimmed away reloads. Each
model's logs start with an ``init`` entry, so a replica's position is always a real entry.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import redis

LEVELS = ("image", "study")

# Streams are trimmed (approximately) to this many entries; a replica further behind reloads.
LOG_MAXLEN = 1_000_000

# The per-study record of filter attributes, little-endian, 24 bytes.
ATTR_DTYPE = np.dtype(
    [
        ("date", "<i4"),  # StudyDate as YYYYMMDD, 0 unknown
        ("body", "<u2"),  # body part id from ns:vocab:body_part, 0 unknown
        ("flags", "<u2"),  # bit 0: the study has metadata
        ("modmask", "<u8"),  # bit i: the modality with vocabulary number i is in the study
        ("patient", "<u8"),  # patient_key(PatientID), 0 when there is none
    ]
)
ATTR_SIZE = ATTR_DTYPE.itemsize
FLAG_KNOWN = 1
# Modalities past the 63rd distinct one share the last bit (a filter on them may over-include).
MODALITY_BITS = 64

# How long a compaction may hold its (version, level); writers wait at most this long.
COMPACT_LOCK_SECONDS = 600

# KEYS: lock. ARGV: token. Deletes the lock only when it is still ours.
_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Lua helper: study number of ARGV study uid, allocated on first sight. Needs sno, snext keys.
_SN_LUA = """
local function study_number(sno, snext, suid)
  if suid == '' then return 0 end
  local sn = redis.call('HGET', sno, suid)
  if sn then return tonumber(sn) end
  sn = redis.call('INCR', snext)
  redis.call('HSET', sno, suid, sn)
  return sn
end
local function slot_sn(key, s)
  local raw = redis.call('GETRANGE', key, s * 4, s * 4 + 3)
  if string.len(raw) < 4 then return 0 end
  return struct.unpack('<I4', raw)
end
"""

# KEYS: codes, next, slot, uid, tomb, log, slotsn, sno, snext, instance, lock.
# ARGV: uid, code, nbytes, study uid ('' = look it up in the instance hash), log maxlen.
# Returns {slot, changed}: changed is 0 when the same code (and study) was already stored;
# {-1, 0} while a compaction holds the lock (the caller waits and retries).
_UPSERT_LUA = (
    _SN_LUA
    + """
if redis.call('EXISTS', KEYS[11]) == 1 then return {-1, 0} end
local nb = tonumber(ARGV[3])
local suid = ARGV[4]
if suid == '' then suid = redis.call('HGET', KEYS[10], 'study_uid') or '' end
local sn = study_number(KEYS[8], KEYS[9], suid)
local s = redis.call('HGET', KEYS[3], ARGV[1])
if s then
  s = tonumber(s)
  if redis.call('GETRANGE', KEYS[1], s * nb, s * nb + nb - 1) == ARGV[2] then
    if sn ~= 0 and slot_sn(KEYS[7], s) ~= sn then
      redis.call('SETRANGE', KEYS[7], s * 4, struct.pack('<I4', sn))
      redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[5], '*', 'op', 'link', 'slot', s, 'sn', sn)
    end
    return {s, 0}
  end
  if sn == 0 then sn = slot_sn(KEYS[7], s) end
else
  s = redis.call('INCR', KEYS[2]) - 1
  redis.call('HSET', KEYS[3], ARGV[1], s)
  redis.call('HSET', KEYS[4], s, ARGV[1])
end
redis.call('SETRANGE', KEYS[1], s * nb, ARGV[2])
redis.call('SETRANGE', KEYS[7], s * 4, struct.pack('<I4', sn))
redis.call('SETBIT', KEYS[5], s, 0)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[5], '*', 'op', 'set', 'slot', s, 'uid', ARGV[1],
           'code', ARGV[2], 'sn', sn)
return {s, 1}
"""
)

# KEYS: slot, uid, tomb, log, lock. ARGV: uid, log maxlen. Returns the freed slot, -1 when the
# UID has no code, -2 while a compaction holds the lock.
_DELETE_LUA = """
if redis.call('EXISTS', KEYS[5]) == 1 then return -2 end
local s = redis.call('HGET', KEYS[1], ARGV[1])
if not s then return -1 end
s = tonumber(s)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], s)
redis.call('SETBIT', KEYS[3], s, 1)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'op', 'del', 'slot', s, 'uid', ARGV[1])
return s
"""

# KEYS: sno, snext, then (slot, slotsn, log, lock) for the image level of each model version.
# ARGV: sop uid, study uid, log maxlen. Points the instance's image slots at its study.
# Returns the study number, or -1 while a compaction holds a lock (nothing done).
_LINK_LUA = (
    _SN_LUA
    + """
local i = 3
while i <= #KEYS do
  if redis.call('EXISTS', KEYS[i + 3]) == 1 then return -1 end
  i = i + 4
end
local sn = study_number(KEYS[1], KEYS[2], ARGV[2])
i = 3
while i <= #KEYS do
  local s = redis.call('HGET', KEYS[i], ARGV[1])
  if s then
    s = tonumber(s)
    if slot_sn(KEYS[i + 1], s) ~= sn then
      redis.call('SETRANGE', KEYS[i + 1], s * 4, struct.pack('<I4', sn))
      redis.call('XADD', KEYS[i + 2], 'MAXLEN', '~', ARGV[3], '*', 'op', 'link', 'slot', s, 'sn', sn)
    end
  end
  i = i + 4
end
return sn
"""
)

# KEYS: sno, snext. ARGV: study uid. Returns the study number (allocated on first sight).
_STUDY_NUMBER_LUA = _SN_LUA + "\nreturn study_number(KEYS[1], KEYS[2], ARGV[1])\n"

# KEYS: vocabulary hash. ARGV: terms. Returns their numbers (1, 2, ... in order of first sight).
_VOCAB_LUA = """
local out = {}
for i, term in ipairs(ARGV) do
  local v = redis.call('HGET', KEYS[1], term)
  if not v then
    v = redis.call('HINCRBY', KEYS[1], '#next', 1)
    redis.call('HSET', KEYS[1], term, v)
  end
  out[i] = tonumber(v)
end
return out
"""


class StoreError(RuntimeError):
    """The store refuses an operation (unknown model version, wrong code width...)."""


@dataclass(frozen=True)
class ModelInfo:
    version: str
    nbits: int
    state: str

    @property
    def nbytes(self) -> int:
        return self.nbits // 8


@dataclass
class Snapshot:
    """One consistent copy of a (version, level) for a replica's bulk load (see :meth:`CodeStore.snapshot`)."""

    version: str
    level: str
    nbits: int
    generation: int
    n_slots: int
    codes: bytes  # n_slots * nbytes
    slot_sn: np.ndarray  # uint32 (n_slots,)
    deleted: np.ndarray  # bool (n_slots,)
    attrs: np.ndarray  # ATTR_DTYPE (n_studies + 1,), index = study number
    log_pos: str
    attr_pos: str


@dataclass
class Changes:
    """What happened after a replica's positions (see :meth:`CodeStore.changes`)."""

    active: str | None
    generation: int
    log: list[tuple[str, dict[bytes, bytes]]]
    attrs: list[tuple[str, dict[bytes, bytes]]]
    log_lost: bool  # the replica's last log entry was trimmed away: it must reload
    attr_lost: bool


def patient_key(patient_id: str | None) -> int:
    """The 64-bit key under which a PatientID is filtered (0 for none): BLAKE2b, not the ID itself."""
    pid = (patient_id or "").strip()
    if not pid:
        return 0
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little") or 1


def parse_date(value: str | None) -> int:
    """DICOM DA ``YYYYMMDD`` to an int, 0 when absent or malformed."""
    text = (value or "").strip().replace("-", "").replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return 0
    return int(text)


def split_modalities(value: str | None) -> list[str]:
    """``"CR,DX"`` or ``"CR\\\\DX"`` to ``["CR", "DX"]`` (upper case, no blanks, no duplicates)."""
    out: list[str] = []
    for part in (value or "").replace("\\", ",").split(","):
        term = part.strip().upper()
        if term and term not in out:
            out.append(term)
    return out


class Keys:
    """Builds key names; the layout is documented in the module docstring."""

    def __init__(self, namespace: str = "drh") -> None:
        self.ns = namespace

    def active(self) -> str:
        return f"{self.ns}:model:active"

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

    def emb(self, v: str) -> str:
        return f"{self.ns}:emb:{v}"

    def study(self, uid: str) -> str:
        return f"{self.ns}:study:{uid}"

    def study_instances(self, uid: str) -> str:
        return f"{self.ns}:study:{uid}:instances"

    def instance(self, uid: str) -> str:
        return f"{self.ns}:instance:{uid}"


class CodeStore:
    """Codes and metadata in Redis. One instance per process; thread-safe like its client."""

    def __init__(self, client: redis.Redis, namespace: str = "drh") -> None:
        self.r = client
        self.keys = Keys(namespace)
        self._upsert = client.register_script(_UPSERT_LUA)
        self._delete = client.register_script(_DELETE_LUA)
        self._link = client.register_script(_LINK_LUA)
        self._study_number = client.register_script(_STUDY_NUMBER_LUA)
        self._vocab = client.register_script(_VOCAB_LUA)
        self._unlock = client.register_script(_UNLOCK_LUA)
        self._infos: dict[str, ModelInfo] = {}

    # -- model versions ------------------------------------------------------------------------
    def register_model(self, version: str, nbits: int, **extra: str | int | float) -> ModelInfo:
        """Declare a model version (idempotent); its code width can never change afterwards."""
        key = self.keys.model(version)
        self.r.hsetnx(key, "nbits", nbits)
        self.r.hsetnx(key, "created", time.time())
        self.r.hsetnx(key, "state", "building")
        if extra:
            self.r.hset(key, mapping={k: str(v) for k, v in extra.items()})
        self.r.sadd(self.keys.models(), version)
        for level in LEVELS:
            self._init_log(self.keys.log(version, level))
        self._init_log(self.keys.attrlog())
        info = self.model_info(version)
        if info.nbits != nbits:
            raise StoreError(f"model {version} is registered with {info.nbits} bits, not {nbits}")
        return info

    def _init_log(self, key: str) -> None:
        """Give a stream its first entry, so that a replica's position always names a real entry."""
        if not self.r.exists(key):
            self.r.xadd(key, {"op": "init"}, maxlen=LOG_MAXLEN, approximate=True)

    def model_info(self, version: str) -> ModelInfo:
        data = self.r.hgetall(self.keys.model(version))
        if not data:
            raise StoreError(f"unknown model version {version!r}")
        return ModelInfo(version, int(data[b"nbits"]), data.get(b"state", b"building").decode())

    def _nbytes(self, version: str) -> int:
        """Code width of a version; cached, since it can never change once registered."""
        info = self._infos.get(version)
        if info is None:
            info = self.model_info(version)
            self._infos[version] = info
        return info.nbytes

    def models(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self.keys.models()))

    def set_model_state(self, version: str, state: str) -> None:
        self.r.hset(self.keys.model(version), "state", state)

    def active_version(self) -> str | None:
        value = self.r.get(self.keys.active())
        return value.decode() if value else None

    def activate(self, version: str) -> None:
        """Make ``version`` answer queries (one SET: atomic for every reader)."""
        self.model_info(version)
        self.r.set(self.keys.active(), version)

    def ensure_active(self, version: str) -> bool:
        """Activate ``version`` only when no version is active yet; True when it did."""
        self.model_info(version)
        return bool(self.r.set(self.keys.active(), version, nx=True))

    def drop_model(self, version: str) -> dict[str, int]:
        """Remove a version that no longer answers: its codes, maps, logs and embeddings.

        A re-index leaves the previous version in place (a way back while the new one proves
        itself); this frees its memory once it is not needed. The active version is refused: a
        replica and every worker depend on it. Returns the live codes removed per level.
        """
        self.model_info(version)
        if version == self.active_version():
            raise StoreError(f"model {version} is the active version; activate another one first")
        counts = {level: self.count(version, level) for level in LEVELS}
        k = self.keys
        per_level = (k.codes, k.next, k.slot, k.uid, k.tomb, k.log, k.gen, k.lock, k.slotsn)
        doomed = [key(version, level) for level in LEVELS for key in per_level] + [k.emb(version), k.model(version)]
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(k.models(), version)  # first: instance linking stops visiting its keys
        pipe.unlink(*doomed)  # freed in the background: a big string does not stall Redis
        pipe.execute()
        self._infos.pop(version, None)
        return counts

    # -- codes ---------------------------------------------------------------------------------
    def _code_keys(self, version: str, level: str) -> list[str]:
        if level not in LEVELS:
            raise StoreError(f"unknown level {level!r}")
        k = self.keys
        return [
            k.codes(version, level),
            k.next(version, level),
            k.slot(version, level),
            k.uid(version, level),
            k.tomb(version, level),
            k.log(version, level),
        ]

    def upsert_code(
        self,
        version: str,
        level: str,
        uid: str,
        code: bytes | np.ndarray,
        *,
        study_uid: str | None = None,
    ) -> tuple[int, bool]:
        """Store ``code`` (packed bytes) for ``uid``; returns (slot, changed).

        ``study_uid`` (image level) links the slot to its study for filtering at once; without it
        the link comes from the instance record (``put_instance``), before or after this call.
        """
        nbytes = self._nbytes(version)
        data = bytes(np.asarray(code, dtype=np.uint8).ravel()) if not isinstance(code, bytes) else code
        if len(data) != nbytes:
            raise StoreError(f"code of {len(data)} bytes for a {nbytes * 8}-bit model {version}")
        suid = uid if level == "study" else (study_uid or "")
        keys = [
            *self._code_keys(version, level),
            self.keys.slotsn(version, level),
            self.keys.sno(),
            self.keys.snext(),
            self.keys.instance(uid),
            self.keys.lock(version, level),
        ]
        for _ in self._while_compacting(version, level):
            slot, changed = self._upsert(keys=keys, args=[uid, data, nbytes, suid, LOG_MAXLEN])
            if int(slot) >= 0:
                return int(slot), bool(changed)
        raise AssertionError("unreachable")

    def _while_compacting(self, version: str, level: str) -> Iterator[int]:
        """Attempts of a write that a compaction may turn away: waits, up to the lock's lifetime."""
        deadline = time.monotonic() + COMPACT_LOCK_SECONDS
        attempt = 0
        while True:
            yield attempt
            attempt += 1
            if time.monotonic() > deadline:
                raise StoreError(f"{version}/{level} stayed locked by a compaction for {COMPACT_LOCK_SECONDS} s")
            time.sleep(min(0.2, 0.01 * attempt))

    def delete_code(self, version: str, level: str, uid: str) -> int | None:
        """Tombstone ``uid``'s slot (a later upsert of the same UID takes a new slot)."""
        k = self._code_keys(version, level)
        for _ in self._while_compacting(version, level):
            slot = int(
                self._delete(keys=[k[2], k[3], k[4], k[5], self.keys.lock(version, level)], args=[uid, LOG_MAXLEN])
            )
            if slot != -2:
                return None if slot < 0 else slot
        raise AssertionError("unreachable")

    def get_code(self, version: str, level: str, uid: str) -> bytes | None:
        nbytes = self._nbytes(version)
        slot = self.r.hget(self.keys.slot(version, level), uid)
        if slot is None:
            return None
        s = int(slot)
        return self.r.getrange(self.keys.codes(version, level), s * nbytes, (s + 1) * nbytes - 1)

    def count(self, version: str, level: str) -> int:
        """Live codes (allocated slots minus deleted ones)."""
        return int(self.r.hlen(self.keys.slot(version, level)))

    def slots_of(self, version: str, level: str, uids: Sequence[str]) -> list[int | None]:
        """Slots of UIDs (None for a UID without a live code)."""
        if not uids:
            return []
        raw = self.r.hmget(self.keys.slot(version, level), list(uids))
        return [None if v is None else int(v) for v in raw]

    def uids_of(self, version: str, level: str, slots: Sequence[int]) -> list[str | None]:
        """UIDs of slots (None for a deleted or unallocated slot)."""
        if not len(slots):
            return []
        raw = self.r.hmget(self.keys.uid(version, level), [int(s) for s in slots])
        return [None if v is None else v.decode() for v in raw]

    def resolve(self, version: str, level: str, slots: Sequence[int]) -> tuple[int, list[str | None]]:
        """UIDs of slots together with the generation they belong to (one MULTI).

        A replica checks the generation: after a compaction the same slot numbers name other UIDs.
        """
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.keys.gen(version, level))
        if len(slots):
            pipe.hmget(self.keys.uid(version, level), [int(s) for s in slots])
        out = pipe.execute()
        uids = [None if v is None else v.decode() for v in out[1]] if len(slots) else []
        return int(out[0] or 0), uids

    def compact(self, version: str, level: str) -> int:
        """Renumber the live slots densely (keeping their order) and drop tombstones.

        Returns the number of slots reclaimed. Writers to this (version, level) are held off by a
        lock key for the duration (their upserts wait and retry, see :meth:`upsert_code`), so the
        copy is of a quiet state and nothing written meanwhile is lost; the lock has a lifetime, so
        a compaction that dies does not block ingest for good. Replicas see the new generation and
        reload. Other versions and levels are not affected.
        """
        k = self.keys
        nbytes = self._nbytes(version)
        log = k.log(version, level)
        lock = k.lock(version, level)
        token = f"{os.getpid()}-{time.time_ns()}"
        if not self.r.set(lock, token, nx=True, ex=COMPACT_LOCK_SECONDS):
            raise StoreError(f"a compaction of {version}/{level} is already running")
        try:
            with self.r.pipeline() as pipe:
                # Every write appends to the log; WATCH is the proof that none slipped in.
                pipe.watch(log)
                codes = pipe.get(k.codes(version, level)) or b""
                slotsn = pipe.get(k.slotsn(version, level)) or b""
                uid_map = pipe.hgetall(k.uid(version, level))
                n_slots = int(pipe.get(k.next(version, level)) or 0)
                old = np.fromiter(sorted(int(s) for s in uid_map), np.int64, len(uid_map))
                code_arr = np.frombuffer(codes.ljust(n_slots * nbytes, b"\0"), np.uint8).reshape(n_slots, nbytes)
                sn_arr = np.frombuffer(slotsn.ljust(n_slots * 4, b"\0"), "<u4")[:n_slots]
                uids = [uid_map[str(s).encode()] for s in old.tolist()]
                pipe.multi()
                pipe.set(k.codes(version, level), code_arr[old].tobytes())
                pipe.set(k.slotsn(version, level), sn_arr[old].astype("<u4").tobytes())
                pipe.delete(k.slot(version, level), k.uid(version, level), k.tomb(version, level), log)
                for start in range(0, len(uids), 10_000):
                    chunk = range(start, min(start + 10_000, len(uids)))
                    pipe.hset(k.slot(version, level), mapping={uids[i]: i for i in chunk})
                    pipe.hset(k.uid(version, level), mapping={i: uids[i] for i in chunk})
                pipe.set(k.next(version, level), len(uids))
                pipe.incr(k.gen(version, level))
                pipe.xadd(log, {"op": "init"}, maxlen=LOG_MAXLEN, approximate=True)
                pipe.execute()
                return n_slots - len(uids)
        except redis.WatchError as exc:  # a write that ignored the lock: refuse rather than lose it
            raise StoreError(f"{version}/{level} changed during compaction; nothing was changed") from exc
        finally:
            # Release only our own lock (it may have expired and been taken by another run).
            self._unlock(keys=[lock], args=[token])

    # -- replica support -----------------------------------------------------------------------
    def snapshot(self, version: str, level: str) -> Snapshot:
        """Everything a replica needs, read in one MULTI so that it is one consistent state."""
        k = self.keys
        nbytes = self._nbytes(version)
        pipe = self.r.pipeline(transaction=True)
        pipe.get(k.gen(version, level))
        pipe.get(k.next(version, level))
        pipe.get(k.codes(version, level))
        pipe.get(k.slotsn(version, level))
        pipe.get(k.tomb(version, level))
        pipe.xrevrange(k.log(version, level), count=1)
        pipe.get(k.sattr())
        pipe.xrevrange(k.attrlog(), count=1)
        gen, nxt, codes, slotsn, tomb, last, sattr, alast = pipe.execute()
        n = int(nxt or 0)
        codes = (codes or b"").ljust(n * nbytes, b"\0")[: n * nbytes]
        slot_sn = np.frombuffer((slotsn or b"").ljust(n * 4, b"\0")[: n * 4], "<u4").astype(np.uint32)
        deleted = np.unpackbits(np.frombuffer((tomb or b"").ljust((n + 7) // 8, b"\0"), np.uint8))[:n].astype(bool)
        sattr = sattr or b""
        attrs = np.frombuffer(sattr[: len(sattr) // ATTR_SIZE * ATTR_SIZE], ATTR_DTYPE).copy()
        return Snapshot(
            version=version,
            level=level,
            nbits=nbytes * 8,
            generation=int(gen or 0),
            n_slots=n,
            codes=codes,
            slot_sn=slot_sn,
            deleted=deleted,
            attrs=attrs,
            log_pos=last[0][0].decode() if last else "0-0",
            attr_pos=alast[0][0].decode() if alast else "0-0",
        )

    def changes(self, version: str, level: str, log_pos: str, attr_pos: str, count: int = 50_000) -> Changes:
        """Entries after the given positions (at most ``count`` each), in one round trip.

        Also says whether the entries at the positions still exist: when one was trimmed away,
        entries after it may be lost too, and the replica must reload.
        """
        k = self.keys
        pipe = self.r.pipeline(transaction=True)  # one instant: generation and log agree
        pipe.get(k.active())
        pipe.get(k.gen(version, level))
        pipe.xrange(k.log(version, level), min=f"({log_pos}", count=count)
        pipe.xrange(k.log(version, level), min=log_pos, max=log_pos)
        pipe.xrange(k.attrlog(), min=f"({attr_pos}", count=count)
        pipe.xrange(k.attrlog(), min=attr_pos, max=attr_pos)
        active, gen, log, here, attrs, ahere = pipe.execute()
        return Changes(
            active=active.decode() if active else None,
            generation=int(gen or 0),
            log=[(i.decode(), f) for i, f in log],
            attrs=[(i.decode(), f) for i, f in attrs],
            log_lost=log_pos != "0-0" and not here,
            attr_lost=attr_pos != "0-0" and not ahere,
        )

    def vocabulary(self, field: str, terms: Iterable[str]) -> list[int | None]:
        """Numbers of terms in a filter vocabulary (``modality``, ``body_part``); None if never seen."""
        terms = list(terms)
        if not terms:
            return []
        raw = self.r.hmget(self.keys.vocab(field), terms)
        return [None if v is None else int(v) for v in raw]

    def study_number(self, study_uid: str) -> int:
        return int(self._study_number(keys=[self.keys.sno(), self.keys.snext()], args=[study_uid]))

    # -- embeddings (for DMIH pooling) ---------------------------------------------------------
    def put_embedding(self, version: str, sop_uid: str, embedding: np.ndarray) -> None:
        self.r.hset(self.keys.emb(version), sop_uid, np.asarray(embedding, dtype=np.float16).tobytes())

    def get_embeddings(self, version: str, sop_uids: Iterable[str]) -> dict[str, np.ndarray]:
        uids = list(sop_uids)
        if not uids:
            return {}
        raw = self.r.hmget(self.keys.emb(version), uids)
        return {u: np.frombuffer(b, dtype=np.float16).astype(np.float32) for u, b in zip(uids, raw, strict=True) if b}

    # -- metadata ------------------------------------------------------------------------------
    def put_instance(self, sop_uid: str, study_uid: str, meta: Mapping[str, str | int | float]) -> bool:
        """Record an instance and link it to its study; True when the instance is new."""
        pipe = self.r.pipeline()
        pipe.hset(self.keys.instance(sop_uid), mapping={"study_uid": study_uid, **{k: str(v) for k, v in meta.items()}})
        pipe.sadd(self.keys.study_instances(study_uid), sop_uid)
        _, added = pipe.execute()
        # After the instance hash exists: an image upsert from now on finds the study itself, and
        # one that came before is linked here.
        keys = [self.keys.sno(), self.keys.snext()]
        for v in self.models():
            k = self.keys
            keys += [k.slot(v, "image"), k.slotsn(v, "image"), k.log(v, "image"), k.lock(v, "image")]
        for _ in self._while_compacting("*", "image"):
            if int(self._link(keys=keys, args=[sop_uid, study_uid, LOG_MAXLEN])) >= 0:
                break
        return bool(added)

    def instance(self, sop_uid: str) -> dict[str, str]:
        return _decode(self.r.hgetall(self.keys.instance(sop_uid)))

    def study_instances(self, study_uid: str) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self.keys.study_instances(study_uid)))

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
                        return
                    pipe.multi()
                    pipe.setrange(self.keys.sattr(), sn * ATTR_SIZE, rec)
                    pipe.xadd(self.keys.attrlog(), {"sn": sn, "rec": rec}, maxlen=LOG_MAXLEN, approximate=True)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def _attr_record(self, fields: Mapping[str, str]) -> bytes:
        rec = np.zeros(1, ATTR_DTYPE)
        rec["flags"] = FLAG_KNOWN
        rec["date"] = parse_date(fields.get("study_date"))
        rec["patient"] = patient_key(fields.get("patient_id"))
        mods = split_modalities(fields.get("modalities"))
        if mods:
            mask = 0
            for number in self._vocab(keys=[self.keys.vocab("modality")], args=mods):
                mask |= 1 << min(int(number) - 1, MODALITY_BITS - 1)
            rec["modmask"] = mask
        body = (fields.get("body_part") or "").strip().upper()
        if body:
            (number,) = self._vocab(keys=[self.keys.vocab("body_part")], args=[body])
            rec["body"] = min(int(number), 0xFFFF)
        return rec.tobytes()

    def delete_study(self, study_uid: str) -> int:
        """Remove a study everywhere (a retracted or misfiled study, an erasure request).

        Tombstones its study code and its instances' image codes in every model version, drops
        their embeddings, the instance records and the study's metadata, and blanks its filter
        record. Returns the number of codes deleted. Replicas follow through the change logs.
        """
        sops = self.study_instances(study_uid)
        removed = 0
        for v in self.models():
            removed += self.delete_code(v, "study", study_uid) is not None
            for sop in sops:
                removed += self.delete_code(v, "image", sop) is not None
            if sops:
                self.r.hdel(self.keys.emb(v), *sops)
        pipe = self.r.pipeline(transaction=True)
        for sop in sops:
            pipe.delete(self.keys.instance(sop))
        pipe.delete(self.keys.study(study_uid), self.keys.study_instances(study_uid))
        pipe.execute()
        sn = self.r.hget(self.keys.sno(), study_uid)
        if sn is not None:
            blank = bytes(ATTR_SIZE)
            pipe = self.r.pipeline(transaction=True)
            pipe.setrange(self.keys.sattr(), int(sn) * ATTR_SIZE, blank)
            pipe.xadd(self.keys.attrlog(), {"sn": int(sn), "rec": blank}, maxlen=LOG_MAXLEN, approximate=True)
            pipe.execute()
        return int(removed)

    def study(self, study_uid: str) -> dict[str, str]:
        return _decode(self.r.hgetall(self.keys.study(study_uid)))

    def studies(self, study_uids: Sequence[str]) -> list[dict[str, str]]:
        """Metadata of several studies in one round trip (empty dict for an unknown study)."""
        pipe = self.r.pipeline(transaction=False)
        for uid in study_uids:
            pipe.hgetall(self.keys.study(uid))
        return [_decode(raw) for raw in pipe.execute()]


def _decode(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}
