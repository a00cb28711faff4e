"""``drh-pacs bench query``: C-FIND similar latency at 1M indexed studies, from a DICOM client.

For each kind of codes (clustered: n/1000 centres with bits flipped, what a hashing model makes of
radiographs; random: uniform 64-bit codes) it fills a private Redis (no persistence, a free port)
with the study codes, their filter records and their study metadata hashes in the store's layout,
in bulk, then starts ``drh-pacs serve`` against that Redis with no worker, waits for ``/ready``
(the replicas loaded) and times similar-study C-FINDs (k results, called AE ``SIMILAR``):

- ``pynetdicom assoc``: one persistent association, one C-FIND after another: what a viewer that
  keeps its association open sees (request, search, k pending responses, final response);
- ``pynetdicom assoc, TCP_NODELAY``: the same with Nagle's algorithm off on the client socket (as
  DCMTK does by default), which removes the client's half of the delayed-ACK stalls;
- ``findscu process``: DCMTK ``findscu`` run once per query, process start, association and release
  included: what a script or a viewer that opens an association per query sees;

each without a filter and with a filter (ModalitiesInStudy CT and a five-year StudyDate range).
Every reference study has one image with stored variants, so each query is re-ranked as the
shipped layout model's are: 27 variants over a 1,000-code shortlist.
Warm-up queries are discarded; measured queries are repeated ``--repeats`` times and the spread of
the per-repeat p50 is printed. The reference of each query is a random indexed study (fixed seed).
The replica's cold load is timed in this process too, and the time serve needed to be ready.

The reference here is the in-process search (``ReplicaIndex.search``, same filters, same k) timed
in this process: the ratio C-FIND / in-process is the cost of DICOM, the process boundary and the
metadata lookups.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hashing.variants import VARIANTS
from plugin.bench.common import (
    FindClient,
    Latencies,
    ServeProcess,
    close_serve,
    dcmtk,
    latency_table,
    log,
    start_serve,
    wait_http_ready,
)
from plugin.bench.index import BODY_PARTS, MODALITIES, _fmt_size, _parse_size, make_codes, private_redis, rerank_vectors
from plugin.search.filters import Filters

VERSION = "bench-query-v1"
FILTER_MODALITY = "CT"
FILTER_DATES = "20100101-20141231"


def study_uid(i: int) -> str:
    return f"2.25.{1000000 + i}"


def populate(store, codes: np.ndarray, seed: int) -> None:  # noqa: ANN001
    """n studies with random attributes and matching metadata hashes, in bulk
    (:func:`plugin.store.bulk.load_studies`). Study i has slot i and study number i + 1."""
    from plugin.store import ATTR_DTYPE, FLAG_KNOWN, patient_key
    from plugin.store.bulk import load_studies

    n = codes.shape[0]
    rng = np.random.default_rng(seed + 2)
    years = rng.integers(2000, 2026, n)
    dates = years * 10000 + rng.integers(1, 13, n) * 100 + rng.integers(1, 29, n)
    mods = rng.integers(0, len(MODALITIES), n)
    with_dx = rng.random(n) < 0.1
    body = rng.integers(1, len(BODY_PARTS) + 1, n)
    patients = rng.integers(0, max(1, n // 3), n)
    instances = rng.integers(1, 6, n)
    dx_bit = np.uint64(1) << np.uint64(MODALITIES.index("DX"))
    attrs = np.zeros(n + 1, ATTR_DTYPE)
    attrs["flags"][1:] = FLAG_KNOWN
    attrs["date"][1:] = dates
    attrs["modmask"][1:] = (np.uint64(1) << mods.astype(np.uint64)) | np.where(with_dx, dx_bit, np.uint64(0))
    attrs["body"][1:] = body
    pkeys = {p: patient_key(f"P{p}") for p in np.unique(patients).tolist()}
    attrs["patient"][1:] = [pkeys[p] for p in patients.tolist()]

    def record(i: int) -> dict[str, str]:
        return {
            "patient_id": f"P{patients[i]}",
            "patient_name": f"Bench^{patients[i]}",
            "study_date": str(dates[i]),
            "study_time": "101500",
            "study_description": "BENCH STUDY",
            "accession_number": f"A{i:08d}",
            "modalities": MODALITIES[mods[i]] + (",DX" if with_dx[i] and MODALITIES[mods[i]] != "DX" else ""),
            "body_part": BODY_PARTS[body[i] - 1],
            "n_instances": str(instances[i]),
            "source_ae": "BENCHPACS",
        }

    last = [time.monotonic()]

    def progress(done: int) -> None:
        if time.monotonic() - last[0] > 10:
            log(f"    redis: {done}/{n} studies written")
            last[0] = time.monotonic()

    uids = [study_uid(i) for i in range(n)]
    vocab = {"modality": MODALITIES, "body_part": BODY_PARTS}
    reranks = rerank_vectors(codes, seed)
    load_studies(
        store, VERSION, codes, uids, attrs, vocab, record=record, rerank=reranks, step=10_000, progress=progress
    )


def store_reference_variants(store, uids: list[str], seed: int) -> int:  # noqa: ANN001
    """Give each reference study one image with stored variants (:mod:`hashing.variants`), as a
    worker stores them for a layout model, so that every query is re-ranked by 27 variants over the
    1,000-code shortlist as served (:func:`plugin.search.query.reference_variants`). Only the
    references need them: a query never reads the candidates' variants. Returns how many studies."""
    refs = sorted(set(uids))
    variants = rerank_vectors(np.zeros((len(refs) * len(VARIANTS), 8), np.uint8), seed + 4)
    for n, uid in enumerate(refs):
        sop = f"{uid}.1"
        store.records.put_instance(sop, uid, {"series_uid": f"{uid}.0"})
        store.embeddings.put(
            VERSION, sop, np.zeros(8, np.float32), variants[n * len(VARIANTS) : (n + 1) * len(VARIANTS)]
        )
    return len(refs)


def findscu_call(port: int, calling_ae: str, called_ae: str, k: int, uids: list[str], filtered: bool):  # noqa: ANN201
    """A callable that runs one DCMTK findscu similar query per call and checks it got k answers.

    findscu cannot send our private number-of-results element with its VR, so the server is
    started with ``DRH_DEFAULT_RESULTS`` = k instead.
    """
    findscu = dcmtk("findscu")

    def call(i: int) -> None:
        keys = [
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={uids[i % len(uids)]}",
            "PatientID",
            "NumberOfStudyRelatedInstances",
            f"StudyDate={FILTER_DATES}" if filtered else "StudyDate",
            f"ModalitiesInStudy={FILTER_MODALITY}" if filtered else "ModalitiesInStudy",
        ]
        cmd = [findscu, "-S", "-v", "-aet", calling_ae, "-aec", called_ae]
        for key in keys:
            cmd += ["-k", key]
        done = subprocess.run(cmd + ["127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
        out = done.stdout + done.stderr
        if done.returncode != 0 or "Final Find Response (Success)" not in out:
            raise RuntimeError(f"findscu exit {done.returncode}: {out.strip().splitlines()[-1:]}")
        got = out.count("Find Response: ")
        if got != k:
            raise RuntimeError(f"findscu got {got} answers, not {k}")

    return call


def run_kind(kind: str, args: argparse.Namespace) -> dict:
    import redis

    from plugin.search.replica import ReplicaIndex
    from plugin.store import Store

    n = args.studies
    label = f"[{_fmt_size(n)} {kind} studies, 64-bit]"
    result: dict = {"n": n, "kind": kind}
    t0 = time.perf_counter()
    codes = make_codes(n, 64, kind, args.seed)
    log(f"{label} codes generated in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(args.seed + 3)
    total = args.warmup + args.queries * args.repeats
    uids = [study_uid(int(i)) for i in rng.integers(0, n, size=total)]
    with private_redis() as url, tempfile.TemporaryDirectory(prefix="drh-bench-query-") as tmp:
        client = redis.Redis.from_url(url)
        store = Store(client, args.namespace)
        t0 = time.perf_counter()
        populate(store, codes, args.seed)
        refs = store_reference_variants(store, uids, args.seed)
        result["fill_s"] = time.perf_counter() - t0
        used = int(client.info("memory")["used_memory"])
        log(
            f"{label} Redis filled in {result['fill_s']:.1f} s ({used / 1e6:.0f} MB used by Redis);"
            f" {refs} reference studies with {len(VARIANTS)} stored variants"
        )

        t0 = time.perf_counter()
        replica = ReplicaIndex(store, "study")
        replica.refresh()
        result["replica_load_s"] = time.perf_counter() - t0
        assert len(replica) == n, (len(replica), n)
        log(f"{label} replica cold load in this process: {result['replica_load_s']:.2f} s")

        serve: ServeProcess | None = None
        rows: list[Latencies] = []
        try:
            t0 = time.monotonic()
            serve = start_serve(
                Path(tmp) / "serve",
                redis_url=url,
                workers=0,
                env_extra={
                    "DRH_REDIS_NAMESPACE": args.namespace,
                    "DRH_DEFAULT_RESULTS": str(args.k),
                    "DRH_MAX_RESULTS": str(max(args.k, 100)),
                    # the benchmark's client is a declared viewer, as a real one must be
                    "DRH_DICOM_VIEWERS": f"{args.calling_ae}=127.0.0.1:104",
                },
            )
            started = time.monotonic() - t0
            ready = wait_http_ready(serve, timeout=args.timeout)
            result["serve_start_s"], result["serve_ready_s"] = started, started + ready
            log(f"{label} serve printed 'ready' after {started:.1f} s, /ready 200 after {started + ready:.1f} s")

            result["served_reranking"] = served_reranking(serve, uids[0], args.k)
            log(f"{label} serve re-ranks by: {json.dumps(result['served_reranking'])}")
            rows += in_process_cases(replica, store, uids, args)
            rows += association_cases(serve.dicom_port, uids, args)
            rows += process_cases(serve.dicom_port, uids, args)
        finally:
            if serve is not None:
                close_serve(serve)
            replica.close()
            client.close()

    report(label, args, rows, result)
    return result


def served_reranking(serve: ServeProcess, uid: str, k: int) -> dict | None:
    """What serve says it re-ranked a reference by (the JSON answer's ``reranking``): the check that
    the C-FIND rows measure the variants' re-ranking, which the DICOM answer cannot show."""
    import httpx

    url = f"http://127.0.0.1:{serve.http_port}/api/similar/study/{uid}"
    got = httpx.get(url, params={"k": k}, headers={"Authorization": f"Bearer {serve.token}"}, timeout=60)
    got.raise_for_status()
    return got.json().get("reranking")


def in_process_cases(replica, store, uids: list[str], args: argparse.Namespace) -> list[Latencies]:  # noqa: ANN001
    """The reference: the replica's search in this process, re-ranked as served (the reference's
    variants fetched from Redis, 1,000 codes re-ranked by them), without and with a filter."""
    from plugin.search.query import reference_variants

    rows = []
    filters = Filters(modalities=(FILTER_MODALITY,), date_from=FILTER_DATES[:8], date_to=FILTER_DATES[9:])
    for name, f in (("in-process search", None), ("in-process search, filter", filters)):

        def local(i: int, f: Filters | None = f) -> None:
            uid = uids[i % len(uids)]
            found = replica.lookup(uid)
            if found is None:
                raise RuntimeError(f"{uid} not in the replica")
            variants = reference_variants(store, VERSION, "STUDY", uid, found[1].size)
            if variants is None:
                raise RuntimeError(f"{uid} has no stored variants")
            hits = replica.search(found[0], args.k, filters=f, exclude_uids=(uid,), rerank=variants)
            if len(hits) != args.k:
                raise RuntimeError(f"{len(hits)} hits, not {args.k}")

        rows.append(time_calls_logged(name, local, args))
    return rows


def association_cases(port: int, uids: list[str], args: argparse.Namespace) -> list[Latencies]:
    """A viewer keeping one association open: C-FIND similar (with and without filter, k=1), C-ECHO,
    and the same with Nagle off on the client's side."""
    rows = []
    finder = FindClient("127.0.0.1", port, called_ae=args.similar_ae, calling_ae=args.calling_ae)
    try:
        cases = (("pynetdicom assoc", False, args.k), ("pynetdicom assoc, filter", True, args.k))
        if args.k != 1:  # k = 1 separates the cost per query from the cost per pending response
            cases += (("pynetdicom assoc, k=1", False, 1),)
        for name, filtered, k in cases:

            def viewer(i: int, filtered: bool = filtered, k: int = k) -> None:
                answers = finder.similar(
                    uids[i % len(uids)],
                    k=k,
                    modalities=FILTER_MODALITY if filtered else "",
                    date_range=FILTER_DATES if filtered else "",
                )
                if len(answers) != k:
                    raise RuntimeError(f"{len(answers)} answers, not {k}")

            rows.append(time_calls_logged(name, viewer, args))
        rows.append(time_calls_logged("pynetdicom assoc, C-ECHO", lambda _i: finder.echo(), args))
    finally:
        finder.close()
    nodelay = FindClient("127.0.0.1", port, called_ae=args.similar_ae, calling_ae=args.calling_ae, nodelay=True)
    try:

        def viewer_nodelay(i: int) -> None:
            answers = nodelay.similar(uids[i % len(uids)], k=args.k)
            if len(answers) != args.k:
                raise RuntimeError(f"{len(answers)} answers, not {args.k}")

        rows.append(time_calls_logged("pynetdicom assoc, TCP_NODELAY", viewer_nodelay, args))
    finally:
        nodelay.close()
    return rows


def process_cases(port: int, uids: list[str], args: argparse.Namespace) -> list[Latencies]:
    """One DCMTK process per query, and what a DCMTK process costs before any search: start-up
    alone, then start-up plus an association, a C-ECHO and the release."""
    rows = []
    fargs = argparse.Namespace(**{**vars(args), "queries": args.findscu_queries, "repeats": 1})
    fargs.warmup = min(args.warmup, 5)
    for name, filtered in (("findscu process", False), ("findscu process, filter", True)):
        call = findscu_call(port, args.calling_ae, args.similar_ae, args.k, uids, filtered)
        rows.append(time_calls_logged(name, call, fargs))
    rows.append(time_calls_logged("findscu --version", lambda _i: _run_ok([dcmtk("findscu"), "--version"]), fargs))
    echo = [dcmtk("echoscu"), "-aet", args.calling_ae, "-aec", args.similar_ae, "127.0.0.1", str(port)]
    rows.append(time_calls_logged("echoscu process", lambda _i: _run_ok(echo), fargs))
    return rows


def report(label: str, args: argparse.Namespace, rows: list[Latencies], result: dict) -> None:
    """The latency table, each client against the in-process search, and the set-up times."""
    log(
        f"\n{label} C-FIND similar, k={args.k}; filter = ModalitiesInStudy {FILTER_MODALITY} and StudyDate"
        f" {FILTER_DATES}; {args.warmup} warm-up queries discarded"
    )
    for line in latency_table(rows):
        log(line)
    s = {r.name: r.summary() for r in rows}
    result["latency"] = s
    for client_name in ("pynetdicom assoc", "findscu process"):
        for suffix, ref in (("", "in-process search"), (", filter", "in-process search, filter")):
            a, b = s.get(client_name + suffix, {}), s.get(ref, {})
            if a.get("n") and b.get("n"):
                log(
                    f"  {client_name + suffix}: p50 / {ref} p50 = {a['p50_ms'] / b['p50_ms']:.1f}"
                    f" (+{a['p50_ms'] - b['p50_ms']:.2f} ms)"
                )
    log(
        f"  replica: cold load {result['replica_load_s']:.2f} s in this process; serve ready (/ready 200)"
        f" {result['serve_ready_s']:.1f} s after launch; Redis filled in {result['fill_s']:.1f} s\n"
    )


def _run_ok(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exit {done.returncode}: {done.stderr.strip()[-300:]}")


def time_calls_logged(name: str, call, args: argparse.Namespace) -> Latencies:  # noqa: ANN001
    from plugin.bench.common import time_calls

    log(f"  timing {name}: {args.warmup} warm-up + {args.queries} x {args.repeats}")
    return time_calls(name, call, args.queries, args.warmup, args.repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drh-pacs bench query", description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", default="1M", help="indexed studies, K/M suffixes (default 1M)")
    p.add_argument("--kinds", default="clustered,random", help="clustered and/or random codes")
    p.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--queries", type=int, default=200, help="measured queries per repeat (default 200)")
    p.add_argument("--findscu-queries", type=int, default=100, help="measured findscu runs (one repeat)")
    p.add_argument("--warmup", type=int, default=20, help="queries run first and discarded")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--namespace", default="drh", help="Redis namespace used in the private Redis")
    p.add_argument("--similar-ae", default="SIMILAR")
    p.add_argument("--calling-ae", default="BENCHSCU")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for serve to be ready")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    args.studies = _parse_size(args.studies)
    if args.studies <= args.k:
        p.error("--studies must be larger than --k")
    log(
        f"drh-pacs bench query: {_fmt_size(args.studies)} studies, kinds {args.kinds}, k={args.k},"
        f" {args.queries} queries x {args.repeats} repeats (findscu: {args.findscu_queries}), seed {args.seed}"
    )
    results = []
    try:
        for kind in args.kinds.split(","):
            results.append(run_kind(kind.strip(), args))
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"drh-pacs bench query: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
