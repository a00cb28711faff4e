"""``drh-pacs bench index``: Hamming k-NN latency at 1M and 10M codes, side by side with FAISS.

For each size and kind of data (uniform random codes; clustered codes, closer to what a hashing
model makes of radiographs) it builds the codes with a fixed seed and times, one query at a time
on one thread, k-NN for:

- ``ours scan``: :func:`hashing.search.knn`, the exact scan over 64-bit word planes;
- ``ours auto``: what :class:`plugin.search.replica.ReplicaIndex` does at that size (multi-index hashing
  with a candidate budget, falling back to the scan);
- ``ours MIH``: exact multi-index hashing without the budget;
- ``faiss flat``: ``IndexBinaryFlat`` (exact);
- ``faiss MIH``: ``IndexBinaryMultiHash`` (approximate: its recall@k is reported).

Warm-up queries are discarded; the measured queries are repeated ``--repeats`` times and the
spread of the per-repeat p50 is printed. Every exact method's distances are checked against
FAISS flat's on every query. Up to ``--redis-max`` codes, the codes are also written into a
private Redis (no persistence, a free port) in the store's layout, and the replica's cold load,
its refresh with nothing new, its incremental sync of 10k real upserts and its end-to-end search
(answer UIDs included, and with filters) are timed.

Queries are database codes with a few bits flipped (a new image like an indexed one).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hashing.drh import rerank_dim
from hashing.resnet import RESNET18_HALF_LAYOUT
from hashing.search import MultiIndexHash, Planner, Selector, knn, query_words, to_words
from hashing.variants import VARIANTS
from plugin.bench.common import latency_table, time_interleaved
from plugin.search.replica import MIH_MIN

MODALITIES = ["CR", "DX", "CT", "MR", "US", "MG"]
BODY_PARTS = ["CHEST", "ABDOMEN", "HAND", "KNEE", "HEAD"]


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * mult)


def _fmt_size(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}K"
    return str(n)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _random_words(rng: np.random.Generator, n: int, p_log2: int = 0) -> np.ndarray:
    """n uint64 words whose bits are set with probability 2**-p_log2 (AND of p_log2 uniform words)."""
    w = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    for _ in range(p_log2 - 1):
        w &= rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    return w


def make_codes(n: int, nbits: int, kind: str, seed: int, chunk: int = 1 << 20) -> np.ndarray:
    """``(n, nbits // 8)`` packed codes. Clustered: n/1000 centres, each bit flipped with p = 1/16."""
    rng = np.random.default_rng(seed)
    words = (nbits + 63) // 64
    out = np.empty((n, words * 8), np.uint8)
    view = out.view(np.uint64).reshape(n, words)
    if kind == "random":
        for w in range(words):
            view[:, w] = _random_words(rng, n, 1)
    elif kind == "clustered":
        centres = _random_words(rng, max(1, n // 1000) * words, 1).reshape(-1, words)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            assign = rng.integers(0, centres.shape[0], size=e - s)
            for w in range(words):
                view[s:e, w] = centres[assign, w] ^ _random_words(rng, e - s, 4)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return np.ascontiguousarray(out[:, : nbits // 8])


def make_queries(codes: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Database codes with bits flipped with p = 1/32 (about 2 bits of 64)."""
    rng = np.random.default_rng(seed + 1)
    picked = codes[rng.integers(0, codes.shape[0], size=count)].copy()
    noise = np.stack([_random_words(rng, count, 5) for _ in range((codes.shape[1] + 7) // 8)], axis=1)
    return picked ^ noise.view(np.uint8).reshape(count, -1)[:, : codes.shape[1]]


@dataclass
class Timing:
    name: str
    lat: list[np.ndarray] = field(default_factory=list)  # per repeat, seconds
    mismatches: int = 0
    recall: list[float] = field(default_factory=list)
    note: str = ""

    def summary(self) -> dict[str, float]:
        allv = np.concatenate(self.lat)
        p50s = [float(np.percentile(r, 50)) for r in self.lat]
        return {
            "p50_ms": float(np.percentile(allv, 50)) * 1e3,
            "p99_ms": float(np.percentile(allv, 99)) * 1e3,
            "p50_min_ms": min(p50s) * 1e3,
            "p50_max_ms": max(p50s) * 1e3,
            "qps": float(len(allv) / allv.sum()),
            "recall": float(np.mean(self.recall)) if self.recall else float("nan"),
            "mismatches": self.mismatches,
        }


def time_methods(
    methods: list[tuple[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], bool]],
    queries: np.ndarray,
    warmup: int,
    repeats: int,
    reference: list[np.ndarray],
) -> list[Timing]:
    """Time every method one query at a time, interleaved query by query.

    Interleaving matters on a shared machine: a burst of load from elsewhere hits every method
    alike instead of whichever happened to be running. The order rotates from query to query.
    ``reference`` holds the exact distances of each measured query; exact methods must match
    them, approximate ones report recall@k.
    """
    timings = [Timing(name) for name, _, _ in methods]
    for q in queries[:warmup]:
        for _, fn, _ in methods:
            fn(q)
    measured = queries[warmup:]
    for rep in range(repeats):
        lat = np.empty((len(methods), len(measured)))
        for i, q in enumerate(measured):
            # Rotate the order, so that no method always runs right after another's cache sweep.
            for step in range(len(methods)):
                m = (i + step) % len(methods)
                _, fn, exact = methods[m]
                start = time.perf_counter()
                _, d = fn(q)
                lat[m, i] = time.perf_counter() - start
                if rep == 0:
                    d = np.asarray(d, np.int64).ravel()
                    ref = reference[i]
                    if exact:
                        timings[m].mismatches += int(not np.array_equal(d, ref))
                    else:
                        kth = ref[-1] if len(ref) else 0
                        timings[m].recall.append(float(np.count_nonzero(d[d >= 0] <= kth)) / max(1, len(ref)))
        for m in range(len(methods)):
            timings[m].lat.append(lat[m])
        _log(f"    repeat {rep + 1}/{repeats}: {len(measured)} queries x {len(methods)} methods")
    return timings


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A throw-away redis-server without persistence on a free loopback port."""
    import redis

    from plugin.core.redis_server import free_port, redis_server_binary

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="drh-bench-redis-") as tmp:
        args = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", tmp]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 15
            while True:
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("the benchmark's redis-server did not start") from None
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def populate_store(store, version: str, codes: np.ndarray, seed: int) -> None:  # noqa: ANN001
    """n studies with random filter attributes, in bulk (:func:`plugin.store.bulk.load_studies`).

    Study i has slot i and study number i + 1.
    """
    from plugin.store import ATTR_DTYPE, FLAG_KNOWN, patient_key
    from plugin.store.bulk import load_studies

    n = codes.shape[0]
    rng = np.random.default_rng(seed + 2)
    attrs = np.zeros(n + 1, ATTR_DTYPE)
    attrs["flags"][1:] = FLAG_KNOWN
    attrs["date"][1:] = (
        20000101 + rng.integers(0, 26, n) * 10000 + rng.integers(0, 12, n) * 100 + rng.integers(0, 28, n)
    )
    mods = rng.integers(0, len(MODALITIES), n)
    attrs["modmask"][1:] = (np.uint64(1) << mods.astype(np.uint64)) | np.where(
        rng.random(n) < 0.1, np.uint64(1) << np.uint64(1), np.uint64(0)
    )
    attrs["body"][1:] = rng.integers(1, len(BODY_PARTS) + 1, n)
    patients = rng.integers(0, max(1, n // 3), n)
    attrs["patient"][1:] = [patient_key(f"P{p}") for p in patients.tolist()]
    uids = [f"2.25.{i}" for i in range(n)]
    vocab = {"modality": MODALITIES, "body_part": BODY_PARTS}
    load_studies(store, version, codes, uids, attrs, vocab, rerank=rerank_vectors(codes, seed))


# The shipped model's re-ranking vectors are its whitened 16 x 16 layout (hashing.drh.rerank_key).
RERANK_DIM = rerank_dim(64, int(RESNET18_HALF_LAYOUT["layout"]))


def rerank_vectors(codes: np.ndarray, seed: int, width: int = RERANK_DIM) -> np.ndarray:
    """int8 re-ranking vectors of the shipped model's width, one per code (random: the layout key
    does not follow the bits, and re-ranking costs the same whatever the values)."""
    rng = np.random.default_rng(seed + 5)
    return rng.integers(-127, 128, (len(codes), width), dtype=np.int8)


def bench_replica(codes: np.ndarray, queries: np.ndarray, args: argparse.Namespace, results: dict) -> None:
    """Cold load, refresh, incremental sync and end-to-end search of the replica against Redis."""
    import redis

    from plugin.core.processes import freeze_startup_heap
    from plugin.search.filters import Filters
    from plugin.search.query import fetch_reranking
    from plugin.search.replica import ReplicaIndex
    from plugin.store import UID_WIDTH, Store

    n = codes.shape[0]
    with private_redis() as url:
        client = redis.Redis.from_url(url)
        store = Store(client, namespace="bench")
        t0 = time.perf_counter()
        populate_store(store, "bench-v1", codes, args.seed)
        _log(f"    redis: {n} codes written in {time.perf_counter() - t0:.1f} s")
        loads = []
        idx = None
        for _ in range(args.repeats):
            idx = ReplicaIndex(store, "study")
            start = time.perf_counter()
            idx.refresh()
            loads.append(time.perf_counter() - start)
            assert len(idx) == n
        assert idx is not None
        results["load_s"] = {"median": float(np.median(loads)), "min": min(loads), "max": max(loads)}
        results["replica_bytes_per_code"] = idx.memory_bytes() / n
        results["replica_rerank_bytes_per_code"] = RERANK_DIM
        results["replica_uid_bytes_per_code"] = UID_WIDTH
        _log(
            f"    replica cold load from Redis: median {np.median(loads):.3f} s"
            f" (min {min(loads):.3f}, max {max(loads):.3f}); {idx.memory_bytes() / n:.1f} bytes/code in memory,"
            f" {RERANK_DIM} of them the re-ranking vector, {UID_WIDTH} the UID"
        )
        lat = []
        for _ in range(200):
            start = time.perf_counter()
            idx.refresh()
            lat.append(time.perf_counter() - start)
        results["refresh_nothing_ms"] = {"p50": np.percentile(lat, 50) * 1e3, "p99": np.percentile(lat, 99) * 1e3}
        _log(
            f"    refresh with nothing new: p50 {np.percentile(lat, 50) * 1e3:.3f} ms,"
            f" p99 {np.percentile(lat, 99) * 1e3:.3f} ms"
        )
        new = make_codes(10_000, codes.shape[1] * 8, "random", args.seed + 7)
        start = time.perf_counter()
        for i, c in enumerate(new):
            store.codes.upsert("bench-v1", "study", f"2.26.{i}", c)
        ups = time.perf_counter() - start
        start = time.perf_counter()
        idx.refresh()
        inc = time.perf_counter() - start
        assert len(idx) == n + len(new)
        results["upsert_per_s"] = len(new) / ups
        results["incremental_10k_s"] = inc
        _log(f"    10k upserts (one client): {len(new) / ups:.0f}/s; incremental refresh of them: {inc * 1e3:.0f} ms")
        # A filter's result per study is cached and kept up to date (plugin.search.eligible): the same
        # filter at every query measures the cache; a range new to each query, the full pass.
        new_range = "modality CT + a range new to each query"
        cases: dict[str, tuple[Filters | None, str | None]] = {
            "no filter": (None, None),
            "modality CT + 5-year range": (Filters(modalities=("CT",), date_from="20100101", date_to="20141231"), None),
            new_range: (None, None),
            "one patient": (Filters(patient_id="P123"), None),
            "exclude patient": (None, "P123"),
        }
        results["end_to_end"] = {}
        qb = [bytes(q) for q in queries]
        qr = rerank_vectors(queries, args.seed + 1)
        # Each query's reference variants, stored as workers store them; a tolerant query fetches them
        # from Redis while the scan runs (plugin.search.query.fetch_reranking, as run_similar does)
        # and re-ranks 1,000 codes by them.
        qv = rerank_vectors(np.repeat(queries, len(VARIANTS), axis=0), args.seed + 2)
        qv = qv.reshape(len(qb), len(VARIANTS), -1)
        for i, v in enumerate(qv):
            store.embeddings.put("bench-v1", f"2.27.{i}", np.zeros(8, np.float32), v)
        modes = ("plain", "re-ranked", f"re-ranked by {len(VARIANTS)} variants")
        calls = []
        for (label, (f, out)), mode in [(c, m) for c in cases.items() for m in modes]:

            def one(i: int, f: Filters | None = f, out: str | None = out, mode: str = mode, label: str = label) -> None:
                if label == new_range:  # 252 ranges in turn: gone from the cache of 16 when they come again
                    start, end = f"201001{1 + modes.index(mode):02d}", f"2014{1 + i % 12:02d}{1 + i % 28:02d}"
                    f = Filters(modalities=("CT",), date_from=start, date_to=end)
                rr = None
                if mode == modes[1]:
                    rr = qr[i]
                elif mode == modes[2]:
                    rr = fetch_reranking(store, "bench-v1", "IMAGE", f"2.27.{i}", qr[i])
                idx.search(qb[i], args.k, filters=f, exclude_patient=out, exclude_uids=("2.25.0",), rerank=rr)

            calls.append((label if mode == "plain" else f"{label}, {mode}", one))
        # Interleaved query by query: the cases are compared under the same load.
        _log(f"    ReplicaIndex.search k={args.k}, answer UIDs included, {len(calls)} cases interleaved:")
        held = idx.memory_bytes()
        freeze_startup_heap()  # as `serve`'s front process does once started
        try:
            timed = time_interleaved(calls, len(qb) - args.warmup, args.warmup, args.repeats)
        finally:
            gc.unfreeze()
        for row in timed:
            s = row.summary()
            results["end_to_end"][row.name] = {
                key: s[key] for key in ("p50_ms", "p99_ms", "p50_min_ms", "p50_max_ms", "max_ms")
            }
        for line in latency_table(timed):
            _log("  " + line)
        # What the filters keep (results per study and in slot order, the dates in slot order, the
        # row mask) is memory the search costs too.
        kept = (idx.memory_bytes() - held) / n
        results["replica_filter_bytes_per_code"] = kept
        _log(f"    the filtered cases kept {kept:.1f} bytes/code more (filter results, dates in slot order, row mask)")
        client.close()


Method = tuple[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], bool]


def our_methods(codes: np.ndarray, label: str, args: argparse.Namespace) -> tuple[list[Method], dict[str, str]]:
    """Our exact scan, the replica's planner, and multi-index hashing alone, over the same codes."""
    n = codes.shape[0]
    planes = to_words(codes)
    sel = Selector()
    t0 = time.perf_counter()
    mih = MultiIndexHash(args.nbits).build(codes)
    mih_build = time.perf_counter() - t0
    _log(f"{label} our MIH tables built in {mih_build:.1f} s ({mih.nbytes / n:.1f} bytes/code)")
    planner = Planner()
    use_mih = n >= MIH_MIN

    def ours_scan(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return knn(planes, query_words(q), args.k, nbits=args.nbits, selector=sel)

    sel_auto = Selector()  # each method its own: the threshold carried over is per index

    def ours_auto(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return planner.knn(planes, mih if use_mih else None, q.tobytes(), args.k, nbits=args.nbits, selector=sel_auto)

    def ours_mih(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mih.knn(planes, q, args.k)  # type: ignore[return-value]

    notes = {
        "ours scan": f"{planes.nbytes / n:.1f} B/code (word planes)",
        "ours auto": "as ReplicaIndex: MIH with a budget, else scan" if use_mih else "as ReplicaIndex: scan",
        "ours MIH": f"+{mih.nbytes / n:.1f} B/code tables, built in {mih_build:.1f} s",
    }
    return [("ours scan", ours_scan, True), ("ours auto", ours_auto, True), ("ours MIH", ours_mih, True)], notes


def faiss_methods(
    faiss,
    codes: np.ndarray,
    label: str,
    args: argparse.Namespace,  # noqa: ANN001
) -> tuple[list[Method], dict[str, str]]:
    """The reference: FAISS's exact flat binary index, and its (approximate) multi-index hashing."""
    n = codes.shape[0]
    faiss.omp_set_num_threads(args.threads)
    before = _rss()
    flat = faiss.IndexBinaryFlat(args.nbits)
    flat.add(codes)
    notes = {"faiss flat": f"{(_rss() - before) / n:.1f} B/code (RSS growth)"}

    def faiss_flat(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, i = flat.search(q.reshape(1, -1), args.k)
        return i[0], d[0]

    before = _rss()
    t0 = time.perf_counter()
    mh = faiss.IndexBinaryMultiHash(args.nbits, max(1, args.nbits // 16), 16)
    mh.nflip = args.faiss_nflip
    mh.add(codes)
    mh_name = f"faiss MIH nflip={args.faiss_nflip}"
    notes[mh_name] = f"{(_rss() - before) / n:.1f} B/code (RSS growth), built in {time.perf_counter() - t0:.1f} s"
    _log(f"{label} FAISS indexes built")

    def faiss_mih(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, i = mh.search(q.reshape(1, -1), args.k)
        return i[0], np.where(i[0] >= 0, d[0], -1)

    return [("faiss flat", faiss_flat, True), (mh_name, faiss_mih, False)], notes


def exact_distances(codes: np.ndarray, queries: np.ndarray, k: int) -> list[np.ndarray]:
    """The exact k smallest distances of each query, from a plain full sort in another memory layout
    than the planes (not from a timed method)."""
    n = codes.shape[0]
    reference = []
    rows_words = np.zeros((n, (codes.shape[1] + 7) // 8 * 8), np.uint8)
    rows_words[:, : codes.shape[1]] = codes
    rows_words = rows_words.view(np.uint64)  # (n, W), row-major
    for q in queries:
        qw = np.zeros(rows_words.shape[1] * 8, np.uint8)
        qw[: codes.shape[1]] = q
        d = np.bitwise_count(rows_words ^ qw.view(np.uint64)[None, :]).sum(axis=1, dtype=np.int64)
        reference.append(np.sort(np.partition(d, k - 1)[:k]) if n > k else np.sort(d))
    return reference


def report_methods(label: str, timings: list[Timing], args: argparse.Namespace, result: dict) -> None:
    _log(f"\n{label} k={args.k}, {args.queries} queries x {args.repeats} repeats, 1 thread")
    _log(f"  {'method':<20} {'p50 ms':>8} {'p99 ms':>8} {'p50 spread':>17} {'q/s':>8} {'exact?':>12}  memory")
    flat_p50 = None
    for t in timings:
        s = t.summary()
        result["methods"][t.name] = s | {"note": t.note}
        if t.name == "faiss flat":
            flat_p50 = s["p50_ms"]
        check = f"recall {s['recall']:.3f}" if t.recall else f"{s['mismatches']} diff"
        _log(
            f"  {t.name:<20} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {s['p50_min_ms']:7.3f}-{s['p50_max_ms']:<7.3f}  "
            f"{s['qps']:8.0f} {check:>12}  {t.note}"
        )
    if flat_p50:
        for name in ("ours scan", "ours auto", "ours MIH"):
            ratio = result["methods"][name]["p50_ms"] / flat_p50
            _log(f"  {name} p50 / faiss flat p50 = {ratio:.2f}")


def run_case(n: int, kind: str, args: argparse.Namespace, faiss) -> dict:  # noqa: ANN001
    label = f"[{_fmt_size(n)} {kind} {args.nbits}-bit]"
    t0 = time.perf_counter()
    codes = make_codes(n, args.nbits, kind, args.seed)
    queries = make_queries(codes, args.warmup + args.queries, args.seed)
    _log(f"{label} codes generated in {time.perf_counter() - t0:.1f} s")
    result: dict = {"n": n, "kind": kind, "nbits": args.nbits, "methods": {}}
    methods, notes = our_methods(codes, label, args)
    if faiss is not None:
        theirs, their_notes = faiss_methods(faiss, codes, label, args)
        methods = [theirs[0], *methods, theirs[1]]
        notes |= their_notes
    reference = exact_distances(codes, queries[args.warmup :], args.k)
    _log(f"{label} timing {len(methods)} methods, interleaved query by query")
    timings = time_methods(methods, queries, args.warmup, args.repeats, reference)
    for t in timings:
        t.note = notes.get(t.name, "")
    del methods  # frees the FAISS indexes before the replica is loaded
    report_methods(label, timings, args, result)
    if n <= args.redis_max and kind == args.redis_kind:
        _log(f"{label} replica against Redis:")
        bench_replica(codes, queries, args, result)
    _log("")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drh-pacs bench index", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1M,10M", help="comma separated, K/M suffixes (default 1M,10M)")
    p.add_argument("--kinds", default="random,clustered", help="random and/or clustered")
    p.add_argument("--nbits", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=200, help="measured queries per repeat")
    p.add_argument("--warmup", type=int, default=20, help="queries run first and discarded")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (ours is single-threaded)")
    p.add_argument("--faiss-nflip", type=int, default=2, help="bits flipped per substring by FAISS MIH")
    p.add_argument("--no-faiss", action="store_true", help="skip FAISS (it is the optional `bench` extra)")
    p.add_argument("--redis-max", default="1M", help="sizes up to this also time the replica against Redis")
    p.add_argument("--redis-kind", default="clustered", help="which kind of codes to load into Redis")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    args.redis_max = _parse_size(args.redis_max)
    faiss = None
    if not args.no_faiss:
        try:
            import faiss  # type: ignore[no-redef]
        except ImportError:
            print("faiss is not installed: pip install 'drh-pacs[bench]', or pass --no-faiss", file=sys.stderr)
            return 2
    _log(
        f"drh-pacs bench index: sizes {args.sizes}, kinds {args.kinds}, {args.nbits} bits, k={args.k}, "
        f"seed {args.seed}, numpy {np.__version__}" + (f", faiss {faiss.__version__}" if faiss else "")
    )
    results = []
    for size in args.sizes.split(","):
        for kind in args.kinds.split(","):
            results.append(run_case(_parse_size(size), kind.strip(), args, faiss))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
