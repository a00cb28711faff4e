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
``ns:emb:{v}``                              hash     SOPInstanceUID -> float16 instance embedding
                                                     (input of the DMIH study pooling)
``ns:study:{uid}``                          hash     study metadata for C-FIND answers and filters
``ns:study:{uid}:instances``                set      SOPInstanceUIDs received for the study
``ns:instance:{uid}``                       hash     study_uid, series_uid, sop_class_uid, modality,
                                                     path (file kept on disk), received_at
==========================================  =======  =================================================

Upserts are idempotent by UID: writing the same UID again reuses its slot, and writing the same
code again changes nothing and logs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import redis

LEVELS = ("image", "study")

# KEYS: codes, next, slot, uid, tomb, log. ARGV: uid, code, nbytes.
# Returns {slot, changed}: changed is 0 when the same code was already stored under that UID.
_UPSERT_LUA = """
local nb = tonumber(ARGV[3])
local s = redis.call('HGET', KEYS[3], ARGV[1])
if s then
  s = tonumber(s)
  if redis.call('GETRANGE', KEYS[1], s * nb, s * nb + nb - 1) == ARGV[2] then
    return {s, 0}
  end
else
  s = redis.call('INCR', KEYS[2]) - 1
  redis.call('HSET', KEYS[3], ARGV[1], s)
  redis.call('HSET', KEYS[4], s, ARGV[1])
end
redis.call('SETRANGE', KEYS[1], s * nb, ARGV[2])
redis.call('SETBIT', KEYS[5], s, 0)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', 1000000, '*', 'op', 'set', 'slot', s, 'uid', ARGV[1])
return {s, 1}
"""

# KEYS: slot, uid, tomb, log. ARGV: uid. Returns the freed slot or -1.
_DELETE_LUA = """
local s = redis.call('HGET', KEYS[1], ARGV[1])
if not s then return -1 end
s = tonumber(s)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], s)
redis.call('SETBIT', KEYS[3], s, 1)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 1000000, '*', 'op', 'del', 'slot', s, 'uid', ARGV[1])
return s
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


class Keys:
    """Builds key names; the layout is documented in the module docstring."""

    def __init__(self, namespace: str = "drh") -> None:
        self.ns = namespace

    def active(self) -> str:
        return f"{self.ns}:model:active"

    def model(self, v: str) -> str:
        return f"{self.ns}:model:{v}"

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

    # -- model versions ------------------------------------------------------------------------
    def register_model(self, version: str, nbits: int, **extra: str | int | float) -> ModelInfo:
        """Declare a model version (idempotent); its code width can never change afterwards."""
        key = self.keys.model(version)
        self.r.hsetnx(key, "nbits", nbits)
        self.r.hsetnx(key, "created", time.time())
        self.r.hsetnx(key, "state", "building")
        if extra:
            self.r.hset(key, mapping={k: str(v) for k, v in extra.items()})
        info = self.model_info(version)
        if info.nbits != nbits:
            raise StoreError(f"model {version} is registered with {info.nbits} bits, not {nbits}")
        return info

    def model_info(self, version: str) -> ModelInfo:
        data = self.r.hgetall(self.keys.model(version))
        if not data:
            raise StoreError(f"unknown model version {version!r}")
        return ModelInfo(version, int(data[b"nbits"]), data.get(b"state", b"building").decode())

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

    def upsert_code(self, version: str, level: str, uid: str, code: bytes | np.ndarray) -> tuple[int, bool]:
        """Store ``code`` (packed bytes) for ``uid``; returns (slot, changed)."""
        info = self.model_info(version)
        data = bytes(np.asarray(code, dtype=np.uint8).ravel()) if not isinstance(code, bytes) else code
        if len(data) != info.nbytes:
            raise StoreError(f"code of {len(data)} bytes for a {info.nbits}-bit model {version}")
        slot, changed = self._upsert(keys=self._code_keys(version, level), args=[uid, data, info.nbytes])
        return int(slot), bool(changed)

    def delete_code(self, version: str, level: str, uid: str) -> int | None:
        k = self._code_keys(version, level)
        slot = int(self._delete(keys=[k[2], k[3], k[4], k[5]], args=[uid]))
        return None if slot < 0 else slot

    def get_code(self, version: str, level: str, uid: str) -> bytes | None:
        info = self.model_info(version)
        slot = self.r.hget(self.keys.slot(version, level), uid)
        if slot is None:
            return None
        s = int(slot)
        return self.r.getrange(self.keys.codes(version, level), s * info.nbytes, (s + 1) * info.nbytes - 1)

    def count(self, version: str, level: str) -> int:
        """Live codes (allocated slots minus deleted ones)."""
        return int(self.r.hlen(self.keys.slot(version, level)))

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
        return bool(added)

    def instance(self, sop_uid: str) -> dict[str, str]:
        return _decode(self.r.hgetall(self.keys.instance(sop_uid)))

    def study_instances(self, study_uid: str) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(self.keys.study_instances(study_uid)))

    def put_study(self, study_uid: str, meta: Mapping[str, str | int | float]) -> None:
        self.r.hset(self.keys.study(study_uid), mapping={k: str(v) for k, v in meta.items()})

    def study(self, study_uid: str) -> dict[str, str]:
        return _decode(self.r.hgetall(self.keys.study(study_uid)))


def _decode(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}
