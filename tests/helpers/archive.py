"""An indexed archive without a worker process: generated studies in a spool, hashed with the real
encoder and written to the store by the workers' own record and code writers.

For the tests of what reads an archive (HTTP, DICOMweb, the page), where waiting for a worker to
hash every file on a busy 2-core machine would only add minutes, not coverage: the writing itself is
``workers.batching.write_records`` / ``write_codes``, and the study and series codes
``workers.tasks.pool_one``, as ``drh.pool_study`` computes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.dicomgen import Study, make_study


@dataclass(frozen=True)
class Planned:
    """One study to generate: its patient, images (fixture paths), modality and date."""

    patient_id: str
    images: list[Path]
    modality: str = "DX"
    study_date: str = "20240115"
    body_part: str = "CHEST"


def index_archive(
    store: Any, encoder: Any, folder: Path, plan: list[Planned], source_ae: str = "", register: bool = True
) -> list[Study]:
    """Write the planned studies under ``folder`` (``<study>/<sop>.dcm``: the spool's layout when
    ``folder`` is a spool) and index them with ``encoder`` as the workers do; the studies, in order.
    ``register=False``: the caller has registered the encoder's version (as an older release did)."""
    from hashing.preprocess import load_pixels, read_dataset
    from workers.batching import Item, write_codes, write_records
    from workers.tasks import pool_one

    if register:
        store.models.register(encoder.version, encoder.nbits, rerank_dim=encoder.rerank_dim, route=encoder.route)
        store.models.ensure_active(encoder.version)
    studies = []
    for p in plan:
        study = make_study(
            folder,
            p.images,
            patient_id=p.patient_id,
            modality=p.modality,
            study_date=p.study_date,
            body_part=p.body_part,
        )
        items = []
        for path, sop in zip(study.files, study.sop_uids, strict=True):
            ds = read_dataset(path)
            # received when written, as the spool dates a file (its mtime)
            item = Item(sop, study.study_uid, str(path), source_ae, path.stat().st_mtime)
            item.ds, item.pixels = ds, load_pixels(ds)
            items.append(item)
        out = encoder.encode_images([it.pixels for it in items])
        write_records(store, items)
        write_codes(store, [(encoder.version, out)], items)
        pool_one(store, encoder, encoder.version, study.study_uid, study.sop_uids, time.time())
        for it in items:  # the idempotency record, as mark_indexed writes it: serve's reconciler sees them settled
            store.records.update_instance(
                it.sop_uid,
                {
                    "state": "indexed",
                    "indexed_version": encoder.version,
                    "indexed_received_at": repr(it.received_at),
                    "indexed_at": repr(time.time()),
                },
            )
        studies.append(study)
    return studies
