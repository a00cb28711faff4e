"""``drh-pacs bench ingest``: C-STORE throughput against DCMTK storescp, and time to searchable.

The same generated studies (N studies x M DX images, 12-bit, Explicit VR Little Endian) are sent
with DCMTK ``storescu`` (one association per study by default, as a PACS forwarding studies does)
first to DCMTK ``storescp`` writing to a temporary folder, the reference, then to ``drh-pacs
serve``. Both are timed from the first association to the last storescu exit (right after the last
C-STORE response and the release), and reported as images/s, MB/s and the ratio.

For drh-pacs the benchmark then polls the store until every study has its study code (what a
similar query needs), and reports the time from the last C-STORE response to the last study being
searchable; it ends with one C-FIND similar on the last study, so "searchable" is shown, not
assumed. That time includes ``study_stable_seconds`` (the quiet period before a study is pooled),
which the output states.

Before timing, one warm-up study is sent and waited for, so the worker has loaded its model and the
figures are those of a running service, not of its start-up. Each repeat uses new UIDs (the same
pixels), so nothing is deduplicated away.

The reference does less than we do: storescp writes without fsync; drh-pacs fsyncs every file and
its directory before answering (durable spool) and enqueues a task. The ratio is the price of that.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plugin.bench.common import (
    FindClient,
    GeneratedStudy,
    ServeProcess,
    close_serve,
    dcmtk,
    image_files,
    load_image,
    log,
    start_serve,
    synthetic_radiograph,
    write_study,
)


@dataclass
class SendResult:
    wall_s: float
    images: int
    nbytes: int
    end: float  # time.monotonic() when the last storescu exited
    study_end: dict[str, float]  # study uid -> time.monotonic() when its association ended

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.wall_s


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the listener on port {port} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.05)


def send_studies(
    studies: list[GeneratedStudy], host: str, port: int, called_ae: str, calling_ae: str, per_assoc: int
) -> SendResult:
    """Send with DCMTK storescu, ``per_assoc`` studies per association (0: all in one), one after another."""
    groups = [studies] if per_assoc <= 0 else [studies[i : i + per_assoc] for i in range(0, len(studies), per_assoc)]
    storescu = dcmtk("storescu")
    study_end: dict[str, float] = {}
    start = time.monotonic()
    for group in groups:
        files = [str(f) for s in group for f in s.files]
        done = subprocess.run(
            [storescu, "-aet", calling_ae, "-aec", called_ae, host, str(port), *files],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"storescu to {called_ae}@{host}:{port} failed ({done.returncode}):\n{done.stderr}")
        now = time.monotonic()
        for s in group:
            study_end[s.study_uid] = now
    end = time.monotonic()
    return SendResult(
        wall_s=end - start,
        images=sum(len(s.files) for s in studies),
        nbytes=sum(s.nbytes for s in studies),
        end=end,
        study_end=study_end,
    )


def wait_searchable(store, study_uids: list[str], timeout: float, poll: float = 0.02) -> dict[str, float]:  # noqa: ANN001
    """time.monotonic() at which each study first had a study code under an answering model version
    (its route's)."""
    pending = list(study_uids)
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    while pending:
        versions = sorted(set(store.models.active_routes().values()))
        if versions:
            found = [False] * len(pending)
            for version in versions:
                slots = store.codes.slots_of(version, "study", pending)
                found = [f or s is not None for f, s in zip(found, slots, strict=True)]
            now = time.monotonic()
            for uid, ok in zip(pending, found, strict=True):
                if ok:
                    seen[uid] = now
            pending = [u for u, ok in zip(pending, found, strict=True) if not ok]
        if not pending:
            break
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"{len(pending)} of {len(study_uids)} studies not searchable after {timeout:.0f} s")
        if now - last_report > 10:
            log(f"    waiting: {len(study_uids) - len(pending)}/{len(study_uids)} studies searchable")
            last_report = now
        time.sleep(poll)
    return seen


def _images(args: argparse.Namespace, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """N x M pixel arrays, from the data directory when given (chosen with the seed), else synthetic."""
    n, m = args.studies, args.images
    if args.data_dir:
        files = image_files(args.data_dir)
        picked = rng.choice(len(files), size=n * m, replace=len(files) < n * m)
        flat = [load_image(files[i], args.size) for i in picked]
    else:
        flat = [synthetic_radiograph(rng, args.size) for _ in range(n * m)]
    return [flat[i * m : (i + 1) * m] for i in range(n)]


def _worker_info(store) -> str:  # noqa: ANN001
    from plugin.ops.status import gather

    figures = gather(store)
    workers = figures.get("workers", [])
    parts = [
        f"{w['hostname']} device {w.get('device') or '?'} model {','.join(w.get('models') or []) or '?'}"
        f" concurrency {w.get('concurrency')}"
        for w in workers
    ]
    answering = [m for m in figures.get("models", []) if m["active"]]
    models = ", ".join(f"{m['version']} ({m['nbits']} bits, route {m['route']})" for m in answering) or "none"
    tasks = ", ".join(
        f"{task} " + " ".join(f"{outcome} {count}" for outcome, count in sorted(outcomes.items()))
        for task, outcomes in sorted(figures.get("tasks", {}).items())
    )
    latency = figures.get("latency") or {}
    mean = f"; received -> indexed mean {latency['sum'] / latency['count']:.2f} s" if latency.get("count") else ""
    return (
        f"answering models {models}; workers: {'; '.join(parts) if parts else 'none seen'};"
        f" tasks so far: {tasks or 'none recorded'}{mean}"
    )


def _fmt_send(label: str, r: SendResult) -> str:
    return (
        f"    {label}: {r.images} images, {r.nbytes / 1e6:.1f} MB in {r.wall_s:.2f} s:"
        f" {r.images_per_s:.1f} images/s, {r.mb_per_s:.1f} MB/s"
    )


def _start_drh(args: argparse.Namespace, tmp: Path) -> tuple[ServeProcess | None, str, int, str]:
    """The server under test: the running one named on the command line, or a private ``serve``."""
    if args.host:
        log(f"  drh-pacs: the running server {args.called_ae}@{args.host}:{args.port}")
        return None, args.host, args.port, args.redis_url
    env = {"DRH_STUDY_STABLE_SECONDS": str(args.stable_seconds), "DRH_DEVICE": args.device}
    # it asks similar queries to see when a study is searchable: a declared viewer, as a real one must be
    env["DRH_DICOM_VIEWERS"] = f"{args.calling_ae}=127.0.0.1:104"
    if args.model_path:
        env["DRH_MODEL_PATH"] = str(args.model_path)
    t0 = time.monotonic()
    serve = start_serve(tmp / "serve", workers=args.workers, env_extra=env)
    log(
        f"  drh-pacs serve started in {time.monotonic() - t0:.1f} s (embedded Redis, {args.workers}"
        f" worker(s), device {args.device}, study_stable_seconds {args.stable_seconds})"
    )
    return serve, "127.0.0.1", serve.dicom_port, serve.redis_url


def _repeat(
    args: argparse.Namespace,
    studies: list,
    scp: tuple[int, Path],
    drh: tuple[str, int],
    store,  # noqa: ANN001
) -> dict:
    """One repeat: the same studies to storescp, then to drh-pacs until every one is searchable."""
    scp_port, scp_dir = scp
    ref = send_studies(studies, "127.0.0.1", scp_port, args.called_ae, args.calling_ae, args.per_assoc)
    received = sum(1 for p in scp_dir.rglob("*") if p.is_file())
    if received != ref.images:
        raise RuntimeError(f"storescp stored {received} files of {ref.images}")
    log(_fmt_send("DCMTK storescp", ref))
    shutil.rmtree(scp_dir)
    scp_dir.mkdir()

    ours = send_studies(studies, drh[0], drh[1], args.called_ae, args.calling_ae, args.per_assoc)
    log(_fmt_send("drh-pacs      ", ours))
    seen = wait_searchable(store, [s.study_uid for s in studies], args.timeout)
    last = max(seen.values()) - ours.end
    per_study = np.array([seen[u] - ours.study_end[u] for u in seen])
    ratio = ours.images_per_s / ref.images_per_s
    log(
        f"    drh-pacs / storescp throughput = {ratio:.2f}; last C-STORE response -> last study"
        f" searchable: {last:.2f} s (per study, from its own last response: median"
        f" {np.median(per_study):.2f} s, max {per_study.max():.2f} s)"
    )
    return {
        "storescp": {"images_per_s": ref.images_per_s, "mb_per_s": ref.mb_per_s, "wall_s": ref.wall_s},
        "drh_pacs": {"images_per_s": ours.images_per_s, "mb_per_s": ours.mb_per_s, "wall_s": ours.wall_s},
        "ratio": ratio,
        "last_searchable_s": last,
        "per_study_searchable_median_s": float(np.median(per_study)),
        "per_study_searchable_max_s": float(per_study.max()),
        "images": ours.images,
        "mb": ours.nbytes / 1e6,
    }


def run(args: argparse.Namespace) -> dict:
    import redis

    from plugin.core.redis_server import free_port
    from plugin.store import Store

    rng = np.random.default_rng(args.seed)
    results: dict = {"repeats": []}
    with tempfile.TemporaryDirectory(prefix="drh-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        pixels = _images(args, rng)
        warm_pixels = [synthetic_radiograph(rng, args.size) for _ in range(args.images)]
        log(f"  pixels ready in {time.perf_counter() - t0:.1f} s")

        # The reference: DCMTK storescp, single process, writing every file to a folder.
        scp_port = free_port()
        scp_dir = tmp / "storescp"
        scp_dir.mkdir()
        scp_log = (tmp / "storescp.log").open("wb")
        storescp = subprocess.Popen(
            [dcmtk("storescp"), "-aet", args.called_ae, "-od", str(scp_dir), str(scp_port)],
            stdout=scp_log,
            stderr=subprocess.STDOUT,
        )
        serve: ServeProcess | None = None
        try:
            _wait_port("127.0.0.1", scp_port, storescp)
            serve, host, port, redis_url = _start_drh(args, tmp)
            store = Store(redis.Redis.from_url(redis_url), args.namespace)

            # Warm-up: one study through the whole path, so the worker has its model loaded.
            t0 = time.monotonic()
            warm = write_study(tmp / "warmup", warm_pixels, index=99999)
            send_studies([warm], host, port, args.called_ae, args.calling_ae, 1)
            wait_searchable(store, [warm.study_uid], args.timeout)
            log(f"  warm-up study searchable after {time.monotonic() - t0:.1f} s (discarded)")
            results["worker"] = _worker_info(store)
            log(f"  worker: {results['worker']}")

            for rep in range(args.repeats):
                folder = tmp / f"rep{rep}"
                studies = [write_study(folder, imgs, index=i + rep * args.studies) for i, imgs in enumerate(pixels)]
                log(f"  repeat {rep + 1}/{args.repeats}: {len(studies)} studies written")
                results["repeats"].append(_repeat(args, studies, (scp_port, scp_dir), (host, port), store))
                shutil.rmtree(folder)
            results["worker"] = _worker_info(store)
            _check_searchable_over_dicom(args, host, port, studies[-1].study_uid)
        finally:
            if serve is not None:
                close_serve(serve)
            storescp.terminate()
            storescp.wait(10)
            scp_log.close()
    return results


def _check_searchable_over_dicom(args: argparse.Namespace, host: str, port: int, study_uid: str) -> None:
    """Searchable means a similar query answers: ask one over DICOM."""
    finder = FindClient(host, port, called_ae=args.similar_ae, calling_ae=args.calling_ae)
    try:
        answers = finder.similar(study_uid, k=5)
    finally:
        finder.close()
    if not answers:
        raise RuntimeError("the C-FIND similar on the last study answered nothing")
    log(f"  C-FIND similar on the last study: {len(answers)} answers (status success)")


def _report(args: argparse.Namespace, results: dict) -> None:
    reps = results["repeats"]

    def spread(path: tuple[str, ...]) -> str:
        vals = []
        for r in reps:
            v = r
            for p in path:
                v = v[p]
            vals.append(float(v))
        return f"{np.median(vals):8.2f} ({min(vals):.2f}-{max(vals):.2f})"

    assoc = "all studies in one association" if args.per_assoc <= 0 else f"{args.per_assoc} study(ies) per association"
    log(
        f"\n[ingest {args.studies} studies x {args.images} images of {args.size}x{args.size}, 12-bit; {assoc};"
        f" {len(reps)} repeat(s): median (min-max)]"
    )
    log(f"  {'':<26} {'images/s':>24} {'MB/s':>24}")
    for label, key in (("DCMTK storescp (no fsync)", "storescp"), ("drh-pacs (fsync, enqueue)", "drh_pacs")):
        log(f"  {label:<26} {spread((key, 'images_per_s')):>24} {spread((key, 'mb_per_s')):>24}")
    log(f"  drh-pacs / storescp throughput ratio: {spread(('ratio',))}")
    log(
        f"  last C-STORE response -> last study searchable: {spread(('last_searchable_s',))} s"
        f" (includes study_stable_seconds = {args.stable_seconds if not args.host else 'the server setting'})"
    )
    log(f"  per study, its last response -> searchable, median: {spread(('per_study_searchable_median_s',))} s")
    log(f"  worker (whole run, warm-up included): {results.get('worker', '')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drh-pacs bench ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=20, help="studies per repeat (default 20)")
    p.add_argument("--images", type=int, default=4, help="images per study (default 4)")
    p.add_argument("--size", type=int, default=1024, help="image rows = columns (default 1024)")
    p.add_argument("--data-dir", type=Path, help="take pixels from the JPEG/PNG images under this folder")
    p.add_argument(
        "--per-assoc", type=int, default=1, help="studies per storescu association (default 1; 0: all in one)"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stable-seconds", type=float, default=2.0, help="DRH_STUDY_STABLE_SECONDS of the served run")
    p.add_argument("--workers", type=int, default=1, help="worker processes of the served run")
    p.add_argument("--device", default="auto", help="DRH_DEVICE of the served run: auto, cpu, cuda:N")
    p.add_argument("--model-path", type=Path, help="DRH_MODEL_PATH of the served run (default: shipped model)")
    p.add_argument("--host", help="benchmark a running drh-pacs at this host (with --port and --redis-url)")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--redis-url", default="", help="Redis of the running drh-pacs (to see when studies are indexed)")
    p.add_argument("--namespace", default="drh", help="its Redis namespace")
    p.add_argument("--called-ae", default="DRHPACS")
    p.add_argument("--similar-ae", default="SIMILAR")
    p.add_argument("--calling-ae", default="BENCHSCU")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for studies to be searchable")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.host and not args.redis_url:
        p.error("--host needs --redis-url (the benchmark watches the store to see studies become searchable)")
    if args.studies < 1 or args.images < 1 or args.repeats < 1:
        p.error("--studies, --images and --repeats must be at least 1")
    log(
        f"drh-pacs bench ingest: {args.studies} studies x {args.images} images, {args.size}x{args.size},"
        f" {'data ' + str(args.data_dir) if args.data_dir else 'synthetic pixels'}, seed {args.seed},"
        f" {args.repeats} repeat(s)"
    )
    try:
        results = run(args)
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        print(f"drh-pacs bench ingest: {exc}", file=sys.stderr)
        return 1
    _report(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
