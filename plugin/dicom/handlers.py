"""DIMSE handlers of the plugin's SCP: ``handle_<service>(event, *deps)``.

They speak DICOM and nothing else: the similar query is parsed and answered by
:mod:`plugin.dicom.similar` (searched by :mod:`plugin.search.query`), plain matching is
:mod:`plugin.dicom.plain`, durable files :mod:`plugin.dicom.spool`, retrieve forwarding
:mod:`plugin.dicom.move`. Dependencies arrive through the ``(evt.EVT_..., handler, [deps])`` binding
made in :mod:`plugin.dicom.scp`, never through globals. Logs carry UIDs and AE titles only, never patient data.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts
from pynetdicom import events as evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

from plugin.core.header import is_uid
from plugin.core.settings import Settings
from plugin.dicom import admission as admission_mod
from plugin.dicom import move as move_mod
from plugin.dicom import plain, similar
from plugin.dicom import status as st
from plugin.dicom.counters import DicomCounters, note_forwarded, note_rejection
from plugin.dicom.spool import Reconciler, Spool, SpoolEntry, SpoolError
from plugin.dicom.validate import is_image_sop_class, read_received
from plugin.search import query as search
from plugin.search.errors import QueryError

# The storage SOP classes (not Storage Commitment, not media directories): what a sender stores.
STORAGE_CLASSES = frozenset(cx.abstract_syntax for cx in AllStoragePresentationContexts)

log = logging.getLogger("drh.scp")

# A-ASSOCIATE-RJ (result, source, diagnostic): rejected-permanent by the service user.
REJECT_PERMANENT = 0x01
REJECT_SOURCE_USER = 0x01
REJECT_NO_REASON = 0x01
REJECT_CALLING_AE = 0x03
REJECT_CALLED_AE = 0x07


@dataclass
class StoreDeps:
    """What the C-STORE handler needs (bound explicitly)."""

    settings: Settings
    spool: Spool
    reconciler: Reconciler
    # enqueue(entry, source_ae) -> None; raises when the broker is down.
    enqueue: Callable[[SpoolEntry, str], None]
    # Runs the enqueue after the response went out, so a slow broker never holds up the sender.
    executor: Executor
    # record_refusal(sop_uid, study_uid, source_ae, reason, status): notes a refused C-STORE where
    # IT staff look (the failure ledger's refusals); run on the executor, after the answer.
    record_refusal: Callable[[str, str, str, str, int], None] | None = None
    # Where dropped non-image objects are counted (None: not counted, e.g. a test without Redis).
    store: Any = None


def status_with_comment(status: int, comment: str) -> Dataset:
    """A status dataset: pynetdicom copies Status and ErrorComment into the response command."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def called_ae_title(assoc: Any) -> str:
    """The title the requester called (ours or the similar-query one), from its A-ASSOCIATE-RQ.

    ``assoc.acceptor.ae_title`` is always our own title, whatever was called.
    """
    primitive = assoc.requestor.primitive
    return str(getattr(primitive, "called_ae_title", "") or "").strip()


# -- association -----------------------------------------------------------------------------------
# Every Query/Retrieve information model (Patient/Study Root FIND, MOVE, GET...) is under this root:
# they hand out patient data, so only viewers (Settings.may_query) get these contexts.
QUERY_RETRIEVE_ROOT = "1.2.840.10008.5.1.4.1.2."
# A-ASSOCIATE-RJ for a full server: rejected-transient by the service provider, local limit exceeded.
REJECT_TRANSIENT = 0x02
REJECT_SOURCE_PROVIDER = 0x03
REJECT_LOCAL_LIMIT = 0x02


def handle_requested(event: Any, settings: Settings, admission: Any) -> None:
    """Admit or reject a complete A-ASSOCIATE-RQ: titles, address, access, then a free slot.

    - called AE: ours or the similar-query one (our check, not pynetdicom's ``require_called_aet``,
      because two titles are valid);
    - calling AE: storage is open to ``allowed_calling_aes`` (any when empty) and the viewers;
      the similar-query AE serves queries only, so it wants a calling AE that may query;
    - address: ``allowed_addresses`` when set;
    - access: a calling AE that may not query (:meth:`Settings.may_query`) is offered no
      Query/Retrieve context, so C-FIND, C-MOVE and C-GET are refused at negotiation;
    - slots: :meth:`plugin.dicom.admission.Admission.take_slot` (busy: a transient rejection).
    """
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling = str(primitive.calling_ae_title or "").strip()
    called = str(primitive.called_ae_title or "").strip()
    address = assoc.requestor.address
    queries = settings.may_query(calling)
    diagnostic = reason = None
    if called not in {settings.ae_title.strip(), settings.similar_ae_title.strip()}:
        diagnostic, reason = REJECT_CALLED_AE, "called-ae"
    elif settings.allowed_calling_aes and calling not in {*settings.allowed_calling_aes, *settings.dicom_viewers}:
        diagnostic, reason = REJECT_CALLING_AE, "calling-ae"
    elif called == settings.similar_ae_title.strip() and not queries:
        diagnostic, reason = REJECT_CALLING_AE, "calling-ae"
    elif settings.allowed_addresses and address not in settings.allowed_addresses:
        diagnostic, reason = REJECT_NO_REASON, "address"
    if diagnostic is not None:
        note_rejection(assoc, str(reason))
        log.warning(
            "association rejected: calling AE %r, called AE %r, from %s (diagnostic %#04x)",
            calling,
            called,
            address,
            diagnostic,
        )
        _reject(assoc, REJECT_PERMANENT, REJECT_SOURCE_USER, diagnostic)
        return
    busy = admission.take_slot(assoc, address)
    if busy is not None:
        note_rejection(assoc, "busy")
        _reject(assoc, REJECT_TRANSIENT, REJECT_SOURCE_PROVIDER, REJECT_LOCAL_LIMIT)
        return
    if not queries:
        contexts = assoc.acceptor.supported_contexts
        kept = [cx for cx in contexts if not str(cx.abstract_syntax).startswith(QUERY_RETRIEVE_ROOT)]
        if len(kept) < len(contexts):
            assoc.acceptor.supported_contexts = kept
            log.info(
                "calling AE %r from %s may store but not query or retrieve (not in dicom_viewers)", calling, address
            )


def _reject(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    assoc.acse.send_reject(result, source, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()  # as pynetdicom does after its own rejections: lets the DUL send the A-ASSOCIATE-RJ


def _raw_socket(assoc: Any) -> socket.socket | None:
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


def handle_conn_open(event: Any) -> None:
    """Turn Nagle's algorithm off on every accepted connection.

    pynetdicom writes a DIMSE message as several small PDUs; with Nagle on, each pending response
    waits for the peer's delayed ACK (about 40 ms on Linux), which made a C-FIND similar take ~130 ms
    where the search itself takes a few (measured with ``drh-pacs bench query``).
    """
    sock = _raw_socket(event.assoc)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # a closed or non-TCP socket: nothing to tune
        log.debug("TCP_NODELAY not set: %s", exc)


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_QUICKACK_MAX_PDU = 4096


def handle_data_recv(event: Any) -> None:
    """Acknowledge each received PDU at once (``TCP_QUICKACK``) instead of up to 40 ms later.

    The other half of the Nagle problem above, on the client's side: a client that keeps Nagle on
    (pynetdicom's default, and many viewers) sends a request as two writes, command then identifier,
    and the second waits for our ACK of the first, which Linux delays. Acknowledging at once took a
    pynetdicom client's C-FIND similar from ~55 to ~14 ms (k=1) and from ~90 to ~52 ms (k=10) at 20K
    studies (``drh-pacs bench query``). Linux clears the flag by itself, hence once per PDU; only
    after small PDUs (commands, identifiers), so that a stream of pixel data keeps delayed ACKs.
    """
    if _QUICKACK is None or len(event.data) > _QUICKACK_MAX_PDU:
        return
    sock = _raw_socket(event.assoc)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except OSError:  # closed meanwhile: nothing to acknowledge
        pass


# Messages waiting in the association's send queue before a handler produces the next response.
# pynetdicom's send_msg only enqueues: without a bound, a plain C-FIND over a large archive would be
# built whole in memory, and a C-CANCEL would arrive after every response had been produced.
SEND_QUEUE_LIMIT = 16


def wait_for_send_queue(event: Any, limit: int = SEND_QUEUE_LIMIT, timeout: float = 120.0) -> None:
    """Back-pressure: return once the peer has taken all but ``limit`` queued messages."""
    queue = getattr(getattr(event.assoc, "dul", None), "to_provider_queue", None)
    if queue is None:
        return
    deadline = time.monotonic() + timeout
    while queue.qsize() > limit and event.assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.001)


def handle_echo(event: Any) -> int:
    return st.SUCCESS


# -- storage ---------------------------------------------------------------------------------------
def handle_store(event: Any, deps: StoreDeps) -> int | Dataset:
    """Validate, make durable, answer; the task is queued afterwards (never before the file is safe).

    The dataset is on disk already (pynetdicom writes C-STORE datasets to a temporary file as they
    arrive, ``STORE_RECV_CHUNKED_DATASET``): it is checked there and copied to the spool as received,
    so memory does not grow with the object's size.
    """
    request = event.request
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    sop_class = str(request.AffectedSOPClassUID or "")
    calling = str(event.assoc.requestor.ae_title or "").strip()
    named = getattr(event.assoc, _NAMED_CLASS, {}).pop(request.MessageID, None)
    if named is not None:
        reason = f"the C-STORE command names SOP class {named[:64]!r}, not its presentation context's {sop_class}"
        return _refuse(deps, sop_uid, "", calling, st.STORE_SOP_CLASS_NOT_SUPPORTED, reason)
    try:
        received = read_received(event.dataset_path)
        ds = received.dataset
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        ds_sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        ds_class = str(ds.get("SOPClassUID", "") or "")
    except Exception as exc:  # noqa: BLE001 - any decoding error is the sender's malformed dataset
        reason = f"dataset cannot be decoded ({type(exc).__name__})"
        return _refuse(deps, sop_uid, "", calling, st.STORE_CANNOT_UNDERSTAND, reason)
    if not is_image_sop_class(sop_class):
        # Only reachable with non_image_policy "ignore": "reject" does not negotiate these classes.
        log.info("non-image object %s (class %s) from %s accepted and ignored", sop_uid, sop_class, calling)
        modality = str(ds.get("Modality", "") or "").strip()
        deps.executor.submit(_count_ignored, deps, sop_uid, study_uid, sop_class, modality)
        return st.SUCCESS
    # A cut transfer first: it is the cause of whatever else is missing (a truncated file was once
    # refused as "missing UID").
    problem = received.pixel_problem
    if problem is None:
        if not (is_uid(study_uid) and is_uid(series_uid) and is_uid(ds_sop_uid)):
            problem = "missing or invalid Study/Series/SOP Instance UID"
        elif ds_sop_uid != sop_uid:
            problem = "SOPInstanceUID differs from the C-STORE request"
        elif ds_class and ds_class != sop_class:
            reason = "SOPClassUID differs from request"
            return _refuse(deps, sop_uid, study_uid, calling, st.STORE_DATA_SET_DOES_NOT_MATCH_SOP_CLASS, reason)
    if problem:
        return _refuse(deps, sop_uid, study_uid, calling, st.STORE_CANNOT_UNDERSTAND, problem)
    try:
        entry = deps.spool.write(study_uid, sop_uid, _file_chunks(event, calling, received))
    except SpoolError as exc:
        log.error("C-STORE %s from %s: cannot spool (%s)", sop_uid, calling, exc)
        return status_with_comment(st.STORE_OUT_OF_RESOURCES, "cannot store the file durably")
    deps.executor.submit(_enqueue_after_answer, deps, entry, calling)
    return st.SUCCESS


# On an association: message ID -> the SOP class a C-STORE command named in place of its context's.
_NAMED_CLASS = "_drh_store_named_class"


def handle_dimse_recv(event: Any) -> None:
    """A C-STORE whose command names no storage class (its presentation context's is one) is pointed
    back to its context's class before pynetdicom dispatches it, and refused by :func:`handle_store`.

    pynetdicom looks the service up by the command's class and aborts the whole association on one it
    does not know, so every later file of the send was lost to that one. DCMTK sends "31" for a file
    whose SOPClassUID is stored with VR UN (it reads the first byte); PS3.7 9.3.1.1 wants the
    command's class to be its context's.
    """
    message = event.message
    if type(message).__name__ != "C_STORE_RQ":
        return
    command = message.command_set
    named = str(command.get("AffectedSOPClassUID", "") or "")
    if named in STORAGE_CLASSES:
        return
    context = next((cx for cx in event.assoc.accepted_contexts if cx.context_id == message.context_id), None)
    if context is None or context.abstract_syntax not in STORAGE_CLASSES:
        return  # pynetdicom answers a message on a context it did not accept itself
    if not hasattr(event.assoc, _NAMED_CLASS):
        setattr(event.assoc, _NAMED_CLASS, {})
    getattr(event.assoc, _NAMED_CLASS)[command.MessageID] = named
    command.AffectedSOPClassUID = context.abstract_syntax


def _refuse(deps: StoreDeps, sop_uid: str, study_uid: str, calling: str, status: int, reason: str) -> Dataset:
    """Answer a C-STORE with a failure saying why, and note the refusal for IT staff once answered."""
    log.warning("C-STORE %s from %s refused (%#06x): %s", sop_uid, calling, status, reason)
    if deps.record_refusal is not None:
        deps.executor.submit(_record_refusal, deps.record_refusal, sop_uid, study_uid, calling, reason, status)
    return status_with_comment(status, reason)


def _record_refusal(record: Callable[..., None], *args: Any) -> None:
    try:
        record(*args)
    except Exception as exc:  # noqa: BLE001 - Redis away: the sender was told, the log says why
        log.warning("refusal of %s not recorded (%s)", args[0], exc)


def _file_chunks(event: Any, calling: str, received: Any) -> Iterator[bytes]:
    """Preamble, file meta (with the sender's AE title) and the dataset exactly as received.

    The sender's title in the file meta lets the spool alone say where a study came from (for the
    reconciler and for C-MOVE forwarding); the dataset bytes are not re-encoded, so compressed pixel
    data is kept as sent.
    """
    meta = event.file_meta
    meta.SourceApplicationEntityTitle = calling or "UNKNOWN"
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    yield buffer.getvalue()
    yield from received.dataset_bytes()


def _count_ignored(deps: StoreDeps, sop_uid: str, study_uid: str, sop_class: str, modality: str) -> None:
    """A non-image object accepted and dropped by policy is counted with the ignored instances
    (the status page, ``drh_ignored_instances``), like the ones a worker finds."""
    if deps.store is None:
        return
    try:
        reason = f"non-image object (SOP class {sop_class}) not indexed: non_image_policy is ignore"
        deps.store.ledger.record_ignored({"sop_uid": sop_uid, "study_uid": study_uid}, reason)
        deps.store.records.note_unindexed(study_uid, sop_uid, "ignored")
        deps.store.stats.count_modality("ignored", modality)
    except Exception as exc:  # noqa: BLE001 - Redis down: the object is not ours to keep; say so
        log.warning("non-image object %s ignored but not counted (%s)", sop_uid, exc)


def _enqueue_after_answer(deps: StoreDeps, entry: SpoolEntry, source_ae: str) -> None:
    try:
        deps.enqueue(entry, source_ae)
    except Exception as exc:  # noqa: BLE001 - broker down: the reconciler queues it when it is back
        log.warning("instance %s is spooled but not queued yet (%s); the reconciler will retry", entry.sop_uid, exc)
        deps.reconciler.track(entry, enqueued=False)
    else:
        deps.reconciler.track(entry, enqueued=True)


# -- query -----------------------------------------------------------------------------------------
def handle_find(event: Any, settings: Settings, store: Any, indexes: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """Similar-studies query (SIMILAR AE or private key) or plain Study/Patient Root matching."""
    started = time.monotonic()
    called = called_ae_title(event.assoc)
    calling = str(event.assoc.requestor.ae_title or "").strip()
    try:
        identifier = event.identifier
        for _ in identifier.iterall():
            pass
    except Exception as exc:  # noqa: BLE001 - undecodable identifier: the requester's fault
        log.warning("C-FIND from %s: identifier cannot be decoded (%s)", calling, type(exc).__name__)
        yield status_with_comment(st.UNABLE_TO_PROCESS, "malformed identifier: cannot be decoded"), None
        return

    if similar.is_similar_request(identifier, called, settings.similar_ae_title):
        try:
            query = similar.parse_similar(
                identifier,
                called,
                settings.similar_ae_title,
                settings.default_results,
                resolve_accession=lambda accession, patient_id: search.study_by_accession(store, accession, patient_id),
            )
            search.check_k(query, settings.max_results)
            results = search.run_similar(query, store, indexes)
        except QueryError as err:
            log.info("similar C-FIND from %s refused (%s): %s", calling, err.reason, err.comment)
            yield status_with_comment(similar.failure_status(err), err.comment), None
            return
        except Exception as exc:  # noqa: BLE001 - Redis unreachable, a bug: say so, never an empty success
            log.exception("similar C-FIND from %s failed", calling)
            yield status_with_comment(st.UNABLE_TO_PROCESS, f"search failed: {type(exc).__name__}"), None
            return
        requested = similar.requested_keys(identifier)
        for result in results:
            wait_for_send_queue(event)
            if event.is_cancelled:
                yield st.CANCEL, None
                return
            yield (
                st.PENDING,
                similar.similar_answer(
                    result,
                    query,
                    requested,
                    settings.ae_title,
                    results.version,
                    settings.similar_rank_in_description,
                    route=results.route,
                ),
            )
        log.info(
            "similar C-FIND from %s: %s reference %s (route %s), %d result(s) in %.1f ms",
            calling,
            query.level,
            query.reference_uid,
            results.route,
            len(results),
            (time.monotonic() - started) * 1000,
        )
        return

    model = "patient" if event.request.AffectedSOPClassUID == PatientRootQueryRetrieveInformationModelFind else "study"
    try:
        query_plain = plain.parse_plain(identifier, model)
    except QueryError as err:
        log.info("C-FIND from %s refused (%s): %s", calling, err.reason, err.comment)
        yield status_with_comment(st.UNABLE_TO_PROCESS, err.comment), None
        return
    study_filter = query_plain.matching.get("StudyInstanceUID")
    uids = study_filter.split("\\") if study_filter else store.records.iter_study_uids()
    with_instances = query_plain.level in {"SERIES", "IMAGE"}
    records = plain.iter_plain(query_plain, store.records.studies_with_instances(uids, with_instances))
    count = 0
    try:
        for record in records:
            wait_for_send_queue(event)
            if event.is_cancelled:
                yield st.CANCEL, None
                return
            count += 1
            yield st.PENDING, plain.plain_answer(record, query_plain, settings.ae_title)
    except Exception as exc:  # noqa: BLE001 - Redis unreachable mid-answer: a failure, not a short success
        log.exception("C-FIND from %s failed after %d match(es)", calling, count)
        yield status_with_comment(st.UNABLE_TO_PROCESS, f"query failed: {type(exc).__name__}"), None
        return
    log.info("C-FIND from %s: %s level, %d match(es)", calling, query_plain.level, count)


# -- retrieve --------------------------------------------------------------------------------------
def handle_move(
    event: Any, settings: Settings, store: Any, spool: Spool, counters: DicomCounters | None = None
) -> Iterator[Any]:
    """C-MOVE: forwarded to the PACS that sent the study; served from the spool when that is not possible.

    pynetdicom wants the destination's address first, then the number of sub-operations, then one
    (status, dataset) per instance. A forwarded move is done before the first yield, with the source
    PACS's progress passed on to the viewer, and its final counts; a refusal is a failure whose
    ErrorComment says why (``move_mod.MoveResponses``).
    """
    calling = str(event.assoc.requestor.ae_title or "").strip()
    destination = event.move_destination
    destination = (destination.decode() if isinstance(destination, bytes) else str(destination or "")).strip()
    relay = move_mod.MoveResponses(event)

    def refused(reason: str) -> Iterator[Any]:
        log.warning("C-MOVE from %s refused: %s", calling, reason)
        relay.refuse(reason)
        yield ("127.0.0.1", 0)  # not used: no sub-operation follows
        yield 0

    try:
        identifier = event.identifier
        plan = move_mod.plan(identifier, store, spool, settings)
    except QueryError as err:
        yield from refused(err.comment)
        return

    if plan.forward_to is not None:
        outcome = move_mod.forward(plan, identifier, destination, settings, relay)
        source = plan.forward_to.ae_title
        if counters is not None:
            counters.forwarded_move(
                "success" if outcome.ok
                else "cancelled" if outcome.cancelled
                else "refused" if outcome.answered
                else "unreachable"
            )  # fmt: skip
        if outcome.ok or outcome.cancelled:
            log.info(
                "C-MOVE from %s to %s forwarded to %s: status %#06x, %d completed, %d failed",
                calling, destination, source, outcome.status, outcome.completed, outcome.failed,
            )  # fmt: skip
        else:
            hint = ""
            if outcome.answered:
                node = move_mod.lookup_node(settings, destination)
                if node is not None and not move_mod.answers_echo(settings, node):
                    hint = f"; {destination} at {node.host}:{node.port} does not answer a C-ECHO: is it running?"
                else:
                    hint = (
                        f"; a source PACS sends only to the AE titles it knows: is {destination} declared in"
                        f" {source}'s DICOM modalities (Orthanc: DicomModalities)?"
                    )
            log.warning(
                "C-MOVE from %s to %s: the forward to %s FAILED (status %#06x%s)%s%s",
                calling, destination, source, outcome.status, f", {outcome.comment}" if outcome.comment else "",
                "; sending drh-pacs's own copy instead" if plan.local_files else "", hint,
            )  # fmt: skip
        if outcome.ok or outcome.cancelled:
            note_forwarded(event.assoc)
            relay.final_from(outcome)
            yield ("127.0.0.1", 0)  # not used: no local sub-operation follows
            yield 0
            return
        if outcome.status == st.MOVE_DESTINATION_UNKNOWN and not plan.local_files:
            yield (None, None)
            return
        if not plan.local_files:
            yield from refused(f"the source PACS {source} answered {outcome.status:#06x}")
            return

    node = move_mod.lookup_node(settings, destination)
    if node is None:
        log.info("C-MOVE from %s: destination %s is not a known DICOM node", calling, destination)
        yield (None, None)
        return
    if not plan.local_files:
        known = any(store.records.study(uid) for uid in plan.study_uids)
        yield from refused("nothing to retrieve: no source PACS and no stored file" if known else "no such study here")
        return
    yield (node.host, node.port, {"contexts": move_mod.sub_operation_contexts(plan.local_files)})
    yield len(plan.local_files)
    for path in plan.local_files:
        if event.is_cancelled:
            yield st.CANCEL, None
            return
        yield st.PENDING, move_mod.read_for_sending(path)
    # what the destination took is logged from the final response (handle_dimse_sent)


def handle_get(event: Any, settings: Settings, store: Any, spool: Spool) -> Iterator[Any]:
    """C-GET: the spooled files of the study, series or instances named, sent back on the requester's
    own association (its storage contexts with the SCP role, negotiated in :mod:`plugin.dicom.scp`).

    pynetdicom wants the number of sub-operations first, then one (status, dataset) per instance.
    Nothing to send is a failure that says why (the files are not kept here: C-MOVE reaches the
    source PACS), never an empty success.
    """
    calling = str(event.assoc.requestor.ae_title or "").strip()
    try:
        identifier = event.identifier
        studies = move_mod.requested_studies(identifier, store)
        files = move_mod.local_files(identifier, studies, store, spool)
    except QueryError as err:
        comment = err.comment
        files = []
    else:
        known = any(store.records.study(uid) for uid in studies)
        comment = "no stored copy here: retrieve it with C-MOVE (from its PACS)" if known else "no such study here"
    if not files:
        log.info("C-GET from %s refused: %s", calling, comment)
        yield 1  # pynetdicom sends a failure only after the count: one (refused) sub-operation
        yield status_with_comment(st.UNABLE_TO_PROCESS, comment), None
        return
    yield len(files)
    for path in files:
        if event.is_cancelled:
            yield st.CANCEL, None
            return
        yield st.PENDING, move_mod.read_for_sending(path)


def handle_accepted(event: Any, counters: DicomCounters) -> None:
    """Counted; so are the SOP classes refused in it (once each, when no context of theirs was
    accepted), and storage classes of non-images are logged (non_image_policy "reject" offers
    none): the sender sees only "no acceptable presentation context", and nothing reaches the refused
    ledger."""
    counters.association("accepted")
    refused = getattr(event.assoc, "rejected_contexts", None) or []
    if not refused:
        return
    accepted = {cx.abstract_syntax for cx in getattr(event.assoc, "accepted_contexts", None) or []}
    classes = {cx.abstract_syntax for cx in refused if cx.abstract_syntax not in accepted}
    non_image = {uid for uid in classes if uid in STORAGE_CLASSES and not is_image_sop_class(uid)}
    if non_image:
        counters.contexts_rejected("non-image", len(non_image))
        log.info(
            "association from %s: %d non-image storage class(es) refused (%s): DRH_NON_IMAGE_POLICY is reject",
            str(event.assoc.requestor.ae_title or "").strip(), len(non_image),
            ", ".join(sorted(UID(uid).name for uid in non_image)),
        )  # fmt: skip
    if len(classes) > len(non_image):
        counters.contexts_rejected("other", len(classes) - len(non_image))


def handle_rejected(event: Any, counters: DicomCounters) -> None:
    counters.rejected(event.assoc)


def handle_aborted(event: Any, counters: DicomCounters) -> None:
    counters.association("aborted")


def handle_dimse_sent(event: Any, counters: DicomCounters) -> None:
    """The end of a C-MOVE or C-GET, as its final response tells the requester: counted, and logged
    with what the destination took (a handler only knows what it offered)."""
    done = counters.retrieve_answered(event)
    if done is None or done.forwarded:
        return
    calling = str(event.assoc.requestor.ae_title or "").strip()
    n = done.suboperations
    level = logging.INFO if done.status == st.SUCCESS else logging.WARNING
    log.log(
        level,
        "%s from %s answered %#06x: %d sub-operation(s) completed, %d failed, %d with a warning",
        done.operation, calling, done.status, n["completed"], n["failed"], n["warning"],
    )  # fmt: skip


def bindings(
    settings: Settings,
    store: Any,
    indexes: dict[str, Any],
    store_deps: StoreDeps,
    admission: Any,
    counters: DicomCounters | None = None,
) -> list[tuple[Any, ...]]:
    """The event bindings of the SCP: the one place handlers meet their dependencies. Every DIMSE
    handler is counted and timed by ``counters`` (``/metrics``, the status page)."""
    counters = counters or DicomCounters()
    timed = counters.timed
    return [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_CONN_CLOSE, admission_mod.discard_unfinished_dataset),
        (evt.EVT_DATA_RECV, handle_data_recv),
        (evt.EVT_REQUESTED, handle_requested, [settings, admission]),
        (evt.EVT_ACCEPTED, handle_accepted, [counters]),
        (evt.EVT_REJECTED, handle_rejected, [counters]),
        (evt.EVT_ABORTED, handle_aborted, [counters]),
        (evt.EVT_DIMSE_SENT, handle_dimse_sent, [counters]),
        (evt.EVT_DIMSE_RECV, handle_dimse_recv),
        (evt.EVT_C_ECHO, timed("C-ECHO", handle_echo)),
        (evt.EVT_C_STORE, timed("C-STORE", handle_store), [store_deps]),
        (evt.EVT_C_FIND, timed("C-FIND", handle_find), [settings, store, indexes]),
        (evt.EVT_C_MOVE, timed("C-MOVE", handle_move), [settings, store, store_deps.spool, counters]),
        (evt.EVT_C_GET, timed("C-GET", handle_get), [settings, store, store_deps.spool]),
    ]
