"""The plugin's DICOM node: builds the pynetdicom AE from Settings and starts it, non-blocking.

Wiring only (the qrscp pattern): presentation contexts, limits, TLS and the handler bindings; the
DIMSE logic is in :mod:`plugin.dicom.handlers`. ``start_scp`` is self-sufficient, so ``drh-pacs serve`` and
the integration tests start the same thing.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from pydicom import uid as tsuid
from pynetdicom import AE, AllStoragePresentationContexts, _config
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from plugin.core.settings import Settings
from plugin.dicom import handlers
from plugin.dicom.admission import Admission, AdmissionServer, Limits
from plugin.dicom.counters import DicomCounters
from plugin.dicom.spool import Reconciler, Spool, SpoolEntry, source_ae_of
from plugin.dicom.validate import is_image_sop_class
from plugin.store import SETTLED_STATES, Store
from plugin.store.broker import broker_client, queue_depth
from workers.client import enqueue_instance

log = logging.getLogger("drh.scp")

# pynetdicom logs whole request/response identifiers (patient names and IDs) at INFO: never.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# C-STORE datasets go to a temporary file as their fragments arrive (in TMPDIR, which `serve` points
# at data_dir/tmp), never into memory: a 2 GB object costs disk, not RAM (handlers.handle_store).
_config.STORE_RECV_CHUNKED_DATASET = True

# Transfer syntaxes we accept for storage: the ones hashing.decode reads (pydicom + pylibjpeg, and GDCM
# in a child process for the JPEG-family greyscale streams libjpeg refuses, such as 12-bit JPEG
# Extended). Video (MPEG, HEVC) and JPIP-referenced syntaxes are left out, so a sender offering them
# alongside an uncompressed syntax falls back to one we can index instead of storing what we cannot read.
STORAGE_TRANSFER_SYNTAXES = [
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
    tsuid.JPEGBaseline8Bit,
    tsuid.JPEGExtended12Bit,
    tsuid.JPEGLossless,
    tsuid.JPEGLosslessSV1,
    tsuid.JPEGLSLossless,
    tsuid.JPEGLSNearLossless,
    tsuid.JPEG2000Lossless,
    tsuid.JPEG2000,
    tsuid.HTJ2KLossless,
    tsuid.HTJ2KLosslessRPCL,
    tsuid.HTJ2K,
    tsuid.RLELossless,
]
QUERY_TRANSFER_SYNTAXES = [
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
]
# How often the reconciler looks for spooled files that are neither indexed nor queued.
RECONCILE_SECONDS = 30.0


class ScpServer:
    """The running SCP and its helpers; ``shutdown()`` stops accepting, then the background work."""

    def __init__(
        self,
        server: AdmissionServer,
        ae: AE,
        reconciler: Reconciler,
        executor: ThreadPoolExecutor,
        thread: threading.Thread,
        counters: DicomCounters | None = None,
    ) -> None:
        self.server = server
        self.ae = ae
        self.reconciler = reconciler
        self.executor = executor
        self.thread = thread
        # what the listener did since it started (plugin.dicom.counters), for /metrics and /status
        self.counters = counters or DicomCounters()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def admission(self) -> Admission:
        return self.server.admission

    def alive(self) -> bool:
        """Whether the listener still accepts connections."""
        return self.thread.is_alive()

    def shutdown(self, drain_seconds: float = 10.0) -> None:
        """Stop accepting, let running associations finish (bounded), then stop the background work.

        An association still open after ``drain_seconds`` is aborted: its sender gets no response for
        the instance in flight and sends it again, which is harmless (storage is idempotent).
        """
        self.server.shutdown()
        deadline = time.monotonic() + drain_seconds
        while any(a.is_alive() for a in self.ae.active_associations) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        self.executor.shutdown(wait=True)  # queued enqueues run (or fail into the reconciler)
        self.reconciler.stop()


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    # The real limits (established associations, per address) are Admission.take_slot's; this one
    # counts association threads, some of which are still closing, so it only has to stay out of the way.
    ae.maximum_associations = 2 * settings.max_associations + 8
    ae.maximum_pdu_size = settings.max_pdu_size  # announced to the peer, enforced by the admission socket
    ae.network_timeout = settings.dicom_network_timeout
    ae.dimse_timeout = 120
    ae.acse_timeout = settings.dicom_request_timeout
    # Called AE titles (ours and the similar-query one) and peers are checked in handle_requested.
    ae.require_called_aet = False
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        abstract = context.abstract_syntax
        if settings.non_image_policy == "reject" and not is_image_sop_class(abstract):
            continue
        # Both roles accepted as the requester proposes them: a PACS stores to us (we are SCP), a
        # C-GET requester takes the SCP role for its sub-operations (we send them as SCU).
        ae.add_supported_context(abstract, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for abstract in (
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
        PatientRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
        PatientRootQueryRetrieveInformationModelGet,
    ):
        ae.add_supported_context(abstract, QUERY_TRANSFER_SYNTAXES)
    return ae


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server-side TLS from Settings; with ``tls_ca`` set, peers must present a certificate it signed."""
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca:
        ctx.load_verify_locations(settings.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _done_checker(store: Store) -> Callable[[list[SpoolEntry]], set[str]]:
    """Spooled files whose instance is settled (``SETTLED_STATES``: indexed, ignored, failed, stored
    without a model, a slice of a volume series) for this very reception.

    An instance re-sent later (a corrected image) has a newer file: it is not done until a worker
    settles that reception (``indexed_received_at`` >= the file's time). The failure ledger counts
    as settled too: IT staff retry those, not the reconciler.
    """

    def is_done(entries: list[SpoolEntry]) -> set[str]:
        uids = [e.sop_uid for e in entries]
        states = store.records.settled_states(uids)
        failed = store.ledger.contains(uids)
        done = set()
        for entry, (state, settled_at), in_ledger in zip(entries, states, failed, strict=True):
            if in_ledger or (state in SETTLED_STATES and settled_at >= entry.received_at - 1.0):
                done.add(entry.sop_uid)
        return done

    return is_done


def _coming_checker(store: Store, settings: Settings) -> Callable[[list[SpoolEntry]], set[str]]:
    """Spooled files a worker will take without being queued again: their hint waits to be claimed,
    and the ingest queue has messages waiting (each task claims the oldest pending hints with its
    own). With the queue empty, nothing would take them: none is coming, and the reconciler queues
    them; so it does for one whose claim was taken and let go (its own message may be lost)."""
    broker = broker_client(settings.broker_url, store.client)

    def coming(entries: list[SpoolEntry]) -> set[str]:
        try:
            waiting = queue_depth(broker, "ingest")
        except redis.exceptions.RedisError:
            return set()  # the broker is away: queuing them fails too, and keeps them pending
        return store.ingest.pending_among([e.sop_uid for e in entries]) if waiting else set()

    return coming


def _enqueuer(celery_app: Any) -> Callable[..., None]:
    def enqueue(entry: SpoolEntry, source_ae: str | None = None) -> None:
        enqueue_instance(
            celery_app,
            sop_uid=entry.sop_uid,
            study_uid=entry.study_uid,
            path=str(entry.path),
            source_ae=source_ae if source_ae is not None else source_ae_of(entry.path),
            received_at=entry.received_at,
        )

    return enqueue


def start_scp(settings: Settings, store: Store, indexes: dict[str, Any], celery_app: Any) -> ScpServer:
    """Start the DICOM SCP in background threads; the reconciler runs a full spool pass first."""
    spool = Spool(settings.spool_dir)
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    enqueue = _enqueuer(celery_app)
    reconciler = Reconciler(
        spool,
        is_done=_done_checker(store),
        enqueue=lambda entry: enqueue(entry, None),
        interval=RECONCILE_SECONDS,
        coming=_coming_checker(store, settings),
    )
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scp-enqueue")
    store_deps = handlers.StoreDeps(
        settings=settings,
        spool=spool,
        reconciler=reconciler,
        enqueue=enqueue,
        executor=executor,
        record_refusal=store.ledger.record_refused,
        store=store,
    )
    ae = build_ae(settings)
    started = time.monotonic()
    admission = Admission(Limits.from_settings(settings), tls_context(settings))
    counters = DicomCounters()
    counters.active = admission.established  # the associations holding a slot (what the limit counts)
    counters.admission_refusals = admission.refusals.snapshot
    counters.spool_unqueued = lambda: reconciler.unqueued
    server = ae.make_server(
        (settings.dicom_host, settings.dicom_port),
        evt_handlers=handlers.bindings(settings, store, indexes, store_deps, admission, counters),
        server_class=AdmissionServer,
        admission=admission,
    )
    thread = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it from there
    reconciler.start()
    log.info(
        "DICOM SCP %s listening on %s:%d (TLS %s, up to %d associations, %d per address) in %.0f ms",
        settings.ae_title,
        settings.dicom_host,
        server.server_address[1],
        "on" if settings.tls_cert else "off",
        settings.max_associations,
        settings.max_associations_per_address,
        (time.monotonic() - started) * 1000,
    )
    return ScpServer(server, ae, reconciler, executor, thread, counters)
