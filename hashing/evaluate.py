"""``drh-pacs evaluate``: score trained models and baselines with one metric implementation.

Protocol (also written into the JSON): the publisher's test split are the queries, the publisher's
training split is the database (validation images included: they are training data), relevant =
same label. Codes are ranked by Hamming distance, the float reference by cosine distance. For each
DRH model given, its float features (before the hash layer) are scored as the no-hashing reference,
and LSH and ITQ are fitted on its database features at the same code length. Any other model given
(e.g. the CSQ baseline, trained by ``drh-pacs train --method csq``) is scored on its own codes.

With ``--studies``, models carrying a DMIH part are also scored at study level: bags are a patient's
images of one label (:meth:`hashing.data.ImageSet.bags`), DMIH study codes are compared with DRH
image codes pooled per bag (mean of the relaxed codes, then ``>= 0``).

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hashing import baselines
from hashing import checkpoint as ckpt_mod
from hashing.bits import binarize, pack
from hashing.data import load_images, read_manifest
from hashing.dmih import DMIH
from hashing.drh import DRH
from hashing.encoder import resolve_device
from hashing.metrics import cosine_distances, hamming_distances, retrieval_metrics
from hashing.train import encode_set, pool_bags

log = logging.getLogger("hashing.evaluate")

PROTOCOL = (
    "queries: the publisher's test split; database: the publisher's training split; relevant: same label; "
    "ranking by Hamming distance (codes) or cosine distance (float reference), ties in database order"
)


def _row(name: str, kind: str, nbits: int | None, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "nbits": nbits, **extra, **metrics}


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
) -> dict[str, Any]:
    """Figures for every model (and baselines) as a JSON-able dictionary."""
    dev = resolve_device(device)
    man = read_manifest(data, manifest or None)
    q_rows, d_rows = man.split("test"), man.split("train")
    if not q_rows or not d_rows:
        raise SystemExit("the manifest needs both a train and a test split")
    results: list[dict[str, Any]] = []
    study_results: list[dict[str, Any]] = []
    sets: dict[int, tuple[Any, Any]] = {}
    for path in models:
        ck = ckpt_mod.load(path)
        size = int(ck["input_size"])
        if size not in sets:
            sets[size] = (
                load_images(man, q_rows, size, cache_dir or None),
                load_images(man, d_rows, size, cache_dir or None),
            )
        qs, ds = sets[size]
        ql, dl = qs.labels.numpy(), ds.labels.numpy()
        mean, std = float(ck["normalization"]["mean"]), float(ck["normalization"]["std"])
        drh = ckpt_mod.build_module(ck["drh"]).to(dev)
        assert isinstance(drh, DRH)
        method = str(ck.get("training", {}).get("method", "drh"))
        if method == "dmih":
            method = "drh"
        label = f"{method.upper()} {drh.nbits}"
        t0 = time.time()
        fq, hq = encode_set(drh, qs.images, mean, std, dev)
        fd, hd = encode_set(drh, ds.images, mean, std, dev)
        cq, cd = pack(binarize(hq.numpy())), pack(binarize(hd.numpy()))
        m = retrieval_metrics(hamming_distances(cq, cd), ql, dl, hamming=True)
        results.append(_row(label, method, drh.nbits, m, model=ck["version"], path=str(path)))
        log.info("%s: mAP@all %.4f (%.0f s)", label, m["map_all"], time.time() - t0)
        if with_baselines and method == "drh":
            fqn, fdn = fq.numpy(), fd.numpy()
            m = retrieval_metrics(cosine_distances(fqn, fdn), ql, dl, hamming=False)
            results.append(
                _row(f"float ref ({label} features, {fqn.shape[1]}-d)", "float", None, m, model=ck["version"])
            )
            lsh = baselines.fit_lsh(fdn, drh.nbits, seed)
            m = retrieval_metrics(hamming_distances(lsh.encode(fqn), lsh.encode(fdn)), ql, dl, hamming=True)
            results.append(_row(f"LSH {drh.nbits} (on {label} features)", "lsh", drh.nbits, m, model=ck["version"]))
            itq = baselines.fit_itq(fdn, drh.nbits, seed=seed)
            m = retrieval_metrics(hamming_distances(itq.encode(fqn), itq.encode(fdn)), ql, dl, hamming=True)
            results.append(_row(f"ITQ {drh.nbits} (on {label} features)", "itq", drh.nbits, m, model=ck["version"]))
        if studies and ck.get("dmih") is not None:
            dmih = ckpt_mod.build_module(ck["dmih"]).to(dev)
            assert isinstance(dmih, DMIH)
            qb, db = qs.bags(), ds.bags()
            qbl = np.array([ql[b[0]] for b in qb])
            dbl = np.array([dl[b[0]] for b in db])
            gq, _ = encode_set(dmih, qs.images, mean, std, dev)
            gd, _ = encode_set(dmih, ds.images, mean, std, dev)
            sq, sd = pool_bags(dmih, gq, qb, dev), pool_bags(dmih, gd, db, dev)
            m = retrieval_metrics(
                hamming_distances(pack(binarize(sq.numpy())), pack(binarize(sd.numpy()))), qbl, dbl, hamming=True
            )
            study_results.append(_row(f"DMIH {dmih.nbits} study codes", "dmih", dmih.nbits, m, model=ck["version"]))

            def pooled(h: torch.Tensor, bags: list[list[int]]) -> np.ndarray:
                u = torch.tanh(h)
                return pack(binarize(np.stack([u[b].mean(0).numpy() for b in bags])))

            m = retrieval_metrics(hamming_distances(pooled(hq, qb), pooled(hd, db)), qbl, dbl, hamming=True)
            study_results.append(
                _row(f"DRH {drh.nbits} image codes pooled per bag", "drh-pooled", drh.nbits, m, model=ck["version"])
            )
            study_info = {"query_bags": len(qb), "database_bags": len(db)}
    out: dict[str, Any] = {
        "protocol": PROTOCOL,
        "data": str(data),
        "manifest_sha256_16": man.digest,
        "queries": len(q_rows),
        "database": len(d_rows),
        "classes": man.classes,
        "results": results,
    }
    if study_results:
        out["studies"] = {
            "protocol": "bags = a patient's images of one label; queries: test bags; database: training bags; "
            "relevant: same label",
            **study_info,
            "results": study_results,
        }
    return out


def record_metrics(path: str, res: dict[str, Any]) -> None:
    """Store the figures measured for ``path`` (its rows and its baselines) inside the checkpoint."""
    ck = ckpt_mod.load(path)
    rows = [
        {k: v for k, v in r.items() if k not in ("pr_curve", "path")}
        for r in res["results"]
        if r.get("model") == ck["version"]
    ]
    ck["metrics"] = {
        "protocol": res["protocol"],
        "data": res["data"],
        "manifest_sha256_16": res["manifest_sha256_16"],
        "queries": res["queries"],
        "database": res["database"],
        "results": rows,
    }
    if "studies" in res:
        ck["metrics"]["studies"] = {
            **{k: v for k, v in res["studies"].items() if k != "results"},
            "results": [
                {k: v for k, v in r.items() if k != "pr_curve"}
                for r in res["studies"]["results"]
                if r.get("model") == ck["version"]
            ],
        }
    ckpt_mod.save(ck, path)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the headline figures."""
    lines = [
        "| method | bits | mAP@all | mAP@100 | P@10 | P(H<=2) | ties@10 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        h2 = f"{r['precision_hamming2']:.4f}" if "precision_hamming2" in r else "-"
        ties = f"{r['ties_at_10']:.0f}" if "ties_at_10" in r else "-"
        lines.append(
            f"| {r['name']} | {r['nbits'] or 'float'} | {r['map_all']:.4f} | {r['map@100']:.4f} | "
            f"{r['precision@10']:.4f} | {h2} | {ties} |"
        )
    return "\n".join(lines)


def plot_pr(rows: list[dict[str, Any]], path: Path) -> None:
    """Precision-recall curves (ranking cut-offs), one panel per code length; float reference on each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["nbits"] for r in rows if r["nbits"]})
    fig, axes = plt.subplots(1, max(1, len(lengths)), figsize=(5 * max(1, len(lengths)), 4.2), squeeze=False)
    for ax, k in zip(axes[0], lengths or [None], strict=False):
        for r in rows:
            if r["nbits"] == k or (r["kind"] == "float" and f" {k} " in r["name"]):
                style = "--" if r["kind"] == "float" else "-"
                ax.plot(r["pr_curve"]["recall"], r["pr_curve"]["precision"], style, label=r["name"])
        ax.set_title(f"{k} bits" if k else "")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Test queries against the training database, relevant = same label", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DRH_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(
        prog="drh-pacs evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="data directory with manifest.csv (train and test splits)")
    p.add_argument("--manifest", default="")
    p.add_argument("--model", action="append", required=True, help="model checkpoint (repeat for several)")
    p.add_argument("--no-baselines", action="store_true", help="skip float reference, LSH and ITQ")
    p.add_argument("--studies", action="store_true", help="also score DMIH study codes against pooled DRH codes")
    p.add_argument("--out", required=True, help="folder for evaluation.json and pr.png")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--seed", type=int, default=0, help="seed of LSH projections and ITQ initial rotation")
    p.add_argument(
        "--record", action="store_true", help="write each model's figures into its checkpoint's 'metrics' entry"
    )
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    res = evaluate(
        a.data,
        a.model,
        manifest=a.manifest,
        with_baselines=not a.no_baselines,
        studies=a.studies,
        device=a.device,
        cache_dir=a.cache_dir,
        seed=a.seed,
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(res, indent=1) + "\n")
    plot_pr(res["results"], out / "pr.png")
    print(f"Protocol: {res['protocol']} ({res['queries']} queries, {res['database']} database images)\n")
    print(table(res["results"]))
    if "studies" in res:
        s = res["studies"]
        print(f"\nStudies: {s['protocol']} ({s['query_bags']} query bags, {s['database_bags']} database bags)\n")
        print(table(s["results"]))
    if a.record:
        for path in a.model:
            record_metrics(path, res)
    print(f"\nwrote {out / 'evaluation.json'} and {out / 'pr.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
