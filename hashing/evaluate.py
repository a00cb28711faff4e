"""``drh-pacs evaluate``: do the answers look alike? Models, baselines that need no training, and chance,
scored by one implementation (:mod:`hashing.scoring`) on one protocol.

Protocol (also written into the JSON):

- with a ``test`` split: label queries are the test images, the label database the other images
  (train and val); same-patient queries are the test images, the same-patient database every image
  (train, val and test), the query itself left out;
- without one (a DICOM folder, an unsplit manifest): a seeded sample of ``--max-queries`` images are
  the queries, every image the database, the query itself left out.

Rows: chance (a random ranking); 32x32 thumbnails compared by cosine and a 64-bit LSH of them (no
training at all); then for each model (named by its version): its codes (Hamming distance, ties in
random order), its codes as served (the Hamming shortlist re-ranked by the relaxed codes, what the
query process does), its float features (cosine), and LSH and ITQ fitted on those features. Every
figure has a bootstrap 95% interval over queries. With ``--studies`` the same at study level, bags
being real studies (StudyInstanceUID from DICOM, the manifest's ``study`` column otherwise).

Example::

    drh-pacs evaluate --data ../shared/data/cxr-pneumonia --model drh64.pt --model csq64.pt --out eval/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hashing import baselines
from hashing import checkpoint as ckpt_mod
from hashing.bits import binarize, pack, pooled_variants, quantize_rerank
from hashing.data import DataError, ImageSet, Source, load_images, open_source
from hashing.dmih import DMIH
from hashing.drh import DRH
from hashing.encoder import resolve_device
from hashing.inference import encode_set, image_keys, pool_bags, variant_set
from hashing.metrics import paired_bootstrap
from hashing.scoring import SHORTLISTS, Protocol, Rep, score
from hashing.search import SHORTLIST, TOLERANT_SHORTLIST, shortlist_size
from hashing.variants import VARIANTS

log = logging.getLogger("hashing.evaluate")

THUMBNAIL = 32
THUMBNAIL_BITS = 64


# -- the protocol ----------------------------------------------------------------------------------------


def image_protocol(images: ImageSet, splits: list[str], max_queries: int, seed: int) -> Protocol:
    """Queries and databases of the image-level measures (module docstring)."""
    n = len(images)
    everything = np.arange(n)
    labels = images.labels.numpy()
    patients = np.array(images.patients, dtype=object)
    test = np.array([s == "test" for s in splits])
    if test.any():
        queries, label_db = everything[test], everything[~test]
        how = "test split as queries; labels: against train + val; same patient: against every image"
    else:
        rng = np.random.default_rng(seed)
        queries = np.sort(rng.choice(n, min(max_queries, n), replace=False))
        label_db = everything
        how = f"no test split: {len(queries)} images drawn at random (seed {seed}) as queries, every image the database"
    return Protocol(
        labels=labels,
        patients=patients,
        label_queries=queries,
        label_database=label_db,
        same_queries=queries,
        same_database=everything,
        description={"queries": int(len(queries)), "database": int(n), "how": how + "; the query itself left out"},
    )


def study_protocol(images: ImageSet, image_proto: Protocol) -> tuple[Protocol, list[list[int]]]:
    """The same at study level: a study is a query when it holds a query image."""
    bags = images.bags()
    queries_set = set(image_proto.same_queries.tolist())
    label_db_set = set(image_proto.label_database.tolist())
    labels = []
    for b in bags:
        votes = Counter(int(images.labels[i]) for i in b if int(images.labels[i]) >= 0)
        labels.append(votes.most_common(1)[0][0] if votes else -1)
    patients = np.array([images.patients[b[0]] for b in bags], dtype=object)
    is_query = np.array([any(i in queries_set for i in b) for b in bags])
    in_label_db = np.array([all(i in label_db_set for i in b) for b in bags])
    everything = np.arange(len(bags))
    sizes = [len(b) for b in bags]
    proto = Protocol(
        labels=np.array(labels),
        patients=patients,
        label_queries=everything[is_query],
        label_database=everything[in_label_db],
        same_queries=everything[is_query],
        same_database=everything,
        description={
            "studies": len(bags),
            "query_studies": int(is_query.sum()),
            "images_per_study": {"median": float(np.median(sizes)), "max": int(max(sizes))},
            "one_image_studies": int(sum(s == 1 for s in sizes)),
        },
    )
    return proto, bags


# -- methods -----------------------------------------------------------------------------------------------


def _thumbnails(images32: ImageSet) -> np.ndarray:
    return images32.images.reshape(len(images32), -1).numpy().astype(np.float32) / 255.0


def baseline_reps(images32: ImageSet, fit_on: np.ndarray, seed: int) -> list[Rep]:
    """What needs no model: chance, and 32x32 thumbnails (cosine, and a 64-bit LSH of them)."""
    thumbs = _thumbnails(images32)
    lsh = baselines.fit_lsh(thumbs[fit_on], THUMBNAIL_BITS, seed)
    return [
        Rep("chance (random ranking)", "chance"),
        Rep(f"thumbnail {THUMBNAIL}x{THUMBNAIL} cosine", "cosine", vectors=thumbs),
        Rep(
            f"thumbnail {THUMBNAIL}x{THUMBNAIL} LSH {THUMBNAIL_BITS}",
            "hamming",
            codes=lsh.encode(thumbs),
            nbits=THUMBNAIL_BITS,
        ),
    ]


def model_reps(
    ck: dict[str, Any], images: ImageSet, fit_on: np.ndarray, dev: torch.device, with_baselines: bool, seed: int
) -> tuple[list[Rep], dict[str, Any]]:
    """A checkpoint's rows: its codes, as served, its features, and LSH / ITQ of its features."""
    version = str(ck["version"])
    mean, std = float(ck["normalization"]["mean"]), float(ck["normalization"]["std"])
    drh = ckpt_mod.build_module(ck["drh"]).to(dev)
    assert isinstance(drh, DRH)
    feats, heads = encode_set(drh, images.images, mean, std, dev)
    f, h = feats.numpy(), heads.numpy()
    keys = image_keys(drh, feats, heads).numpy()
    codes, vectors = pack(binarize(h)), quantize_rerank(keys).astype(np.float32)
    info = {"model": version, "method": str(ck.get("training", {}).get("method", "drh"))}
    reps = [
        Rep(f"{version} codes", "hamming", codes=codes, nbits=drh.nbits, extra=info),
        Rep(f"{version} served (codes, top {shortlist_size(10)} re-ranked)", "served", codes, vectors, drh.nbits, info),
    ]
    variants = variant_set(drh, images.images, mean, std, dev).numpy()
    stored = quantize_rerank(variants) if variants.size else None  # int8, as the workers store them
    if stored is not None:  # what the service answers for a stored reference (hashing.variants)
        reps.append(
            Rep(_tolerant_name(version), "served", codes, vectors, drh.nbits, info, variants=stored.astype(np.float32))
        )
    if with_baselines:
        reps.append(Rep(f"{version} features ({f.shape[1]}-d float, cosine)", "cosine", vectors=f, extra=info))
        lsh = baselines.fit_lsh(f[fit_on], drh.nbits, seed)
        reps.append(Rep(f"LSH {drh.nbits} on {version} features", "hamming", codes=lsh.encode(f), nbits=drh.nbits))
        if drh.nbits <= f.shape[1]:
            itq = baselines.fit_itq(f[fit_on], drh.nbits, seed=seed)
            reps.append(Rep(f"ITQ {drh.nbits} on {version} features", "hamming", codes=itq.encode(f), nbits=drh.nbits))
    return reps, {
        "drh": drh,
        "feats": feats,
        "heads": heads,
        "keys": keys,
        "mean": mean,
        "std": std,
        "variants": stored,
    }


def _tolerant_name(version: str, what: str = "codes") -> str:
    top = shortlist_size(10, tolerant=True)
    return f"{version} served tolerant ({what}, top {top} re-ranked by {len(VARIANTS)} query variants)"


def study_reps(ck: dict[str, Any], parts: dict[str, Any], bags: list[list[int]], dev: torch.device) -> list[Rep]:
    """Study rows of a checkpoint: its DMIH study codes (when it has DMIH), and its image codes pooled
    per study (mean of the relaxed codes, then the sign; the mean of the images' re-ranking keys).
    A model that serves query variants gets each also as served for a study reference: re-ranked
    by its images' variants pooled (:func:`hashing.bits.pooled_variants`, what the query process does)."""
    version = str(ck["version"])
    relaxed = torch.tanh(parts["heads"]).numpy()
    pooled = np.stack([relaxed[b].mean(axis=0) for b in bags])
    nbits = pooled.shape[1]
    vectors = quantize_rerank(np.stack([parts["keys"][b].mean(axis=0) for b in bags])).astype(np.float32)
    pooled_v = None
    if parts.get("variants") is not None:
        pooled_v = np.stack([pooled_variants(parts["variants"][b]) for b in bags]).astype(np.float32)

    def rows(what: str, codes: np.ndarray, vectors: np.ndarray) -> list[Rep]:
        out = [Rep(f"{version} {what}", "served", codes, vectors, nbits)]
        if pooled_v is not None:
            out.append(Rep(_tolerant_name(version, what), "served", codes, vectors, nbits, variants=pooled_v))
        return out

    reps = rows("image codes pooled per study", pack(binarize(pooled)), vectors)
    if ck.get("dmih") is not None:
        dmih = ckpt_mod.build_module(ck["dmih"]).to(dev)
        assert isinstance(dmih, DMIH)
        feats, _ = encode_set(dmih, _images_of(parts), parts["mean"], parts["std"], dev)
        h_t, study_keys = pool_bags(dmih, feats, bags, dev)
        h, study_vectors = h_t.numpy(), quantize_rerank(study_keys.numpy()).astype(np.float32)
        reps = rows("DMIH study codes", pack(binarize(h)), study_vectors) + reps
    return reps


def _images_of(parts: dict[str, Any]) -> torch.Tensor:
    return parts["images"]


# -- the command ---------------------------------------------------------------------------------------------


def _load(source: Source, size: int, cache_dir: str, threads: int, progress: bool) -> ImageSet:
    return load_images(source, source.items, size, cache_dir or None, threads=threads, progress=progress)


def evaluate(
    data: str,
    models: list[str],
    *,
    manifest: str = "",
    with_baselines: bool = True,
    studies: bool = False,
    device: str = "auto",
    cache_dir: str = "",
    seed: int = 0,
    threads: int = 0,
    n_boot: int = 1000,
    max_queries: int = 1000,
    progress: bool = True,
    paired: bool = False,
) -> dict[str, Any]:
    """Figures for every model, baseline and chance, as a JSON-able dictionary; with ``paired``, the
    first model's served ranking against each other model's, by their difference per query."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    source = open_source(data, manifest or None)
    by_path = {it.path: it for it in source.items}
    images32 = _load(source, THUMBNAIL, cache_dir, threads or 2, progress)
    splits = [by_path[p].split for p in images32.paths]
    proto = image_protocol(images32, splits, max_queries, seed)
    fit_on = proto.label_database if len(proto.label_database) else np.arange(len(images32))
    reps = baseline_reps(images32, fit_on, seed)
    loaded: dict[int, ImageSet] = {THUMBNAIL: images32}
    model_parts = []
    served: list[Rep] = []  # each model's ranking as the service answers (the tolerant one where it has one)
    for path in models:
        ck = ckpt_mod.load(path)
        size = int(ck["input_size"])
        if size not in loaded:
            loaded[size] = _load(source, size, cache_dir, threads or 2, progress)
        if loaded[size].paths != images32.paths:
            raise SystemExit("the images that decode differ between input sizes; cannot compare")
        t0 = time.time()
        new, parts = model_reps(ck, loaded[size], fit_on, dev, with_baselines, seed)
        parts["images"] = loaded[size].images
        log.info("%s encoded in %.0f s", ck["version"], time.time() - t0)
        reps += new
        served.append([r for r in new if r.kind == "served"][-1])
        model_parts.append((ck, parts))
    kept: dict[int, dict[str, np.ndarray]] = {id(r): {} for r in served} if paired else {}
    rows = [score(rep, proto, seed, n_boot, kept.get(id(rep))) for rep in reps]
    out: dict[str, Any] = {
        "protocol": proto.description,
        "measures": {
            "labels": "mAP@all, mAP@100, P@10; relevant = same label; ties in random order (seeded)",
            "same_patient": "recall@1 and @10: another image of the query's patient in the top k, the query itself"
            " left out; over the queries that have one",
            "served_shortlists": f"served rows: r@10 re-ranks the {SHORTLIST} nearest codes by the reference's"
            f" re-ranking vector, or the {TOLERANT_SHORTLIST} nearest by the best over its {len(VARIANTS)} variants"
            " (tolerant rows), as the service does; r@10_from_N re-ranks the N nearest"
            f" ({', '.join(map(str, SHORTLISTS))}), a smaller part of the archive, as a fixed shortlist becomes in a"
            " larger one",
            "intervals": f"bootstrap 95% over queries ({n_boot} resamples)",
        },
        "data": str(data),
        "source": source.kind,
        "manifest_sha256_16": source.digest,
        "classes": source.classes,
        "left_out": source.skipped,
        "images": len(images32),
        "results": rows,
    }
    if paired:
        out["paired"] = paired_rows(served, kept, seed, n_boot)
    if studies:
        sproto, bags = study_protocol(images32, proto)
        thumbs = _thumbnails(images32)
        srows = [
            score(Rep("chance (random ranking)", "chance"), sproto, seed, n_boot),
            score(
                Rep(
                    "thumbnails averaged per study, cosine",
                    "cosine",
                    vectors=np.stack([thumbs[b].mean(0) for b in bags]),
                ),
                sproto,
                seed,
                n_boot,
            ),
        ]
        for ck, parts in model_parts:
            srows += [score(rep, sproto, seed, n_boot) for rep in study_reps(ck, parts, bags, dev)]
        out["studies"] = {"protocol": sproto.description, "results": srows}
    return out


PAIRED_MEASURES = ("map_all", "r@10", "r@1")


def paired_rows(served: list[Rep], kept: dict[int, dict[str, np.ndarray]], seed: int, n_boot: int) -> list[dict]:
    """The first model's served ranking minus each other's, per measure: the mean difference over
    the same queries and its paired bootstrap interval (an interval that excludes 0 is a difference
    these queries show; two rows' own intervals overlapping is not the test)."""
    rows = []
    for first, other in ((served[0], o) for o in served[1:]):
        row: dict[str, Any] = {"a": first.name, "b": other.name}
        for key in PAIRED_MEASURES:
            a, b = kept[id(first)].get(key), kept[id(other)].get(key)
            if a is None or b is None or not a.size:
                continue
            diff, lo, hi = paired_bootstrap(a, b, np.random.default_rng(seed), n_boot)
            row.update({f"{key}_diff": diff, f"{key}_diff_ci": [lo, hi], f"{key}_n": int(a.size)})
        rows.append(row)
    return rows


def _fmt(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None or (isinstance(row.get(key), float) and np.isnan(row[key])):
        return "-"
    lo, hi = row.get(f"{key}_ci", [None, None])
    return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{row[key]:.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the headline figures, intervals in brackets."""
    lines = [
        "| method | bits | same-patient R@1 | R@10 | mAP@all | mAP@100 | P@10 | ties@10 | distinct codes |",
        "| --- | ---: | --- | --- | --- | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        ties = f"{r['ties@10']:.0f}" if "ties@10" in r else "-"
        distinct = f"{r['distinct_codes']} / {r['images']}" if "distinct_codes" in r else "-"
        lines.append(
            f"| {r['name']} | {r['nbits'] or '-'} | {_fmt(r, 'r@1')} | {_fmt(r, 'r@10')} | {_fmt(r, 'map_all')} |"
            f" {_fmt(r, 'map@100')} | {_fmt(r, 'p@10')} | {ties} | {distinct} |"
        )
    served = [r for r in rows if "shortlist" in r]
    if served:
        # What the codes lose of the re-ranking key's neighbours as the archive grows (scoring.py).
        heads = " | ".join(f"R@10 from {s} codes" for s in SHORTLISTS)
        lines += ["", f"| served | {heads} |", "| --- |" + " --- |" * len(SHORTLISTS)]
        for r in served:
            cells = " | ".join(_fmt(r, "r@10" if r["shortlist"] == s else f"r@10_from_{s}") for s in SHORTLISTS)
            lines.append(f"| {r['name']} | {cells} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Same-patient recall@10 and label mAP of every row, with their intervals: one look tells whether
    a model beats the thumbnails and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (k, t)
        for k, t in (("r@10", "same-patient recall@10"), ("map_all", "label mAP@all"))
        if any(k in r for r in rows)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.45 * len(rows) + 1.6), squeeze=False)
    names = [r["name"] for r in rows]
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        vals = [r.get(key, np.nan) for r in rows]
        lo = [v - r.get(f"{key}_ci", [v, v])[0] for v, r in zip(vals, rows, strict=True)]
        hi = [r.get(f"{key}_ci", [v, v])[1] - v for v, r in zip(vals, rows, strict=True)]
        colours = ["#999999" if "chance" in n else "#c58b3c" if "thumbnail" in n else "#3b6ea5" for n in names]
        ax.barh(range(len(rows)), vals, xerr=[lo, hi], color=colours, capsize=3)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def record_metrics(path: str, res: dict[str, Any]) -> None:
    """Store the figures measured for ``path`` (its rows, the baselines and chance) inside the checkpoint."""
    ck = ckpt_mod.load(path)
    version = ck["version"]

    def mine(row: dict[str, Any]) -> bool:
        return (
            row.get("model") == version
            or version in row["name"]
            or "chance" in row["name"]
            or "thumbnail" in row["name"]
        )

    ck["metrics"] = {k: v for k, v in res.items() if k not in ("results", "studies")}
    ck["metrics"]["results"] = [r for r in res["results"] if mine(r)]
    if "studies" in res:
        ck["metrics"]["studies"] = {**res["studies"], "results": [r for r in res["studies"]["results"] if mine(r)]}
    ckpt_mod.save(ck, path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DRH_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(
        prog="drh-pacs evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", required=True, help="a folder with manifest.csv, a manifest CSV, or a folder of DICOM files"
    )
    p.add_argument("--manifest", default="")
    p.add_argument(
        "--model", action="append", default=[], help="model checkpoint (repeat for several; none: baselines only)"
    )
    p.add_argument("--no-baselines", action="store_true", help="skip the features, LSH and ITQ rows of each model")
    p.add_argument("--studies", action="store_true", help="also score at study level (bags = studies)")
    p.add_argument("--out", required=True, help="folder for evaluation.json and evaluation.png")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--seed", type=int, default=0, help="seed of random ties, query sampling, LSH and ITQ")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--max-queries", type=int, default=1000, help="queries drawn when the data has no test split")
    p.add_argument("--record", action="store_true", help="write each model's figures into its checkpoint")
    p.add_argument(
        "--paired",
        action="store_true",
        help="compare the first model's served ranking with each other model's by their difference per query"
        " (paired bootstrap intervals of mAP@all, recall@10 and recall@1)",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        res = evaluate(
            a.data,
            a.model,
            manifest=a.manifest,
            with_baselines=not a.no_baselines,
            studies=a.studies,
            device=a.device,
            cache_dir=a.cache_dir,
            seed=a.seed,
            threads=a.threads,
            n_boot=a.bootstrap,
            max_queries=a.max_queries,
            progress=not a.no_progress,
            paired=a.paired,
        )
    except DataError as exc:
        print(f"drh-pacs evaluate: {exc}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(res, indent=1) + "\n")
    pr = res["protocol"]
    plot(res["results"], out / "evaluation.png", f"{res['data']}: {pr['how']}")
    print(f"Protocol: {pr['how']} ({pr['queries']} queries, {pr['database']} images)\n")
    print(table(res["results"]))
    for row in res.get("paired", []):
        print(f"\n{row['a']}\n  minus {row['b']} (paired, the same queries):")
        for key in PAIRED_MEASURES:
            if f"{key}_diff" in row:
                lo, hi = row[f"{key}_diff_ci"]
                print(f"  {key:8s} {row[f'{key}_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] over {row[f'{key}_n']} queries")
    if "studies" in res:
        s = res["studies"]
        print(f"\nStudies: {json.dumps(s['protocol'])}\n")
        print(table(s["results"]))
        plot(s["results"], out / "evaluation-studies.png", "study level")
    if a.record:
        for path in a.model:
            record_metrics(path, res)
    print(f"\nwrote {out / 'evaluation.json'} and {out / 'evaluation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
