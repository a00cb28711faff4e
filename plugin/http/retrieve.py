"""Send a study to a DICOM node from the browser: the page's "send to" button.

``POST /api/studies/{study_uid}/move`` with JSON ``{"destination": "<AE title>"}``: the same retrieve
as a viewer's C-MOVE to drh-pacs (:mod:`plugin.dicom.move`): forwarded as a C-MOVE to the PACS that
sent the study (it holds the authoritative copy and knows its viewers), else, when the source is not
a known node or refuses and the files are still in the spool, sent from the spool by C-STORE.

Only the AE titles of ``Settings.move_destinations`` (each a declared viewer or node) are
accepted: a browser session cannot send studies to an arbitrary address. The answer says how it went
(``via`` pacs or spool, completed / failed / warning sub-operations); a failure is an HTTP error with
the reason, logged with UIDs and AE titles only.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from plugin.core.header import is_uid
from plugin.core.settings import Settings
from plugin.dicom import move
from plugin.dicom import status as st
from plugin.dicom.spool import Spool
from plugin.search.errors import QueryError

log = logging.getLogger("drh.retrieve")


class SendError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def send_study(settings: Settings, store: Any, study_uid: str, destination: str) -> dict[str, Any]:
    """Move one study to ``destination``; the outcome as the answer's JSON. Raises SendError."""
    if destination not in settings.move_destinations:
        raise SendError(403, f"{destination!r} is not one of the page's destinations (DRH_MOVE_DESTINATIONS)")
    node = move.lookup_node(settings, destination)
    if node is None:
        raise SendError(500, f"{destination} is declared in neither DRH_DICOM_VIEWERS nor DRH_DICOM_NODES")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    try:
        plan = move.plan(identifier, store, Spool(settings.spool_dir), settings)
    except QueryError as err:
        raise SendError(400, err.comment) from err
    if plan.forward_to is not None:
        outcome = move.forward(plan, identifier, destination, settings)
        if outcome.ok:
            log.info("sent study %s to %s through %s", study_uid, destination, plan.forward_to.ae_title)
            return {"via": "pacs", "source": plan.forward_to.ae_title, **_counts(outcome)}
        log.warning(
            "PACS %s could not send study %s to %s (status %#06x)",
            plan.forward_to.ae_title,
            study_uid,
            destination,
            outcome.status,
        )
        if not plan.local_files:
            raise SendError(502, f"the PACS {plan.forward_to.ae_title} answered {outcome.status:#06x}")
    if not plan.local_files:
        raise SendError(404, "nothing to send: no known source PACS and no stored file")
    return {"via": "spool", **_store_files(settings, node, plan.local_files, study_uid)}


def _counts(outcome: move.ForwardOutcome) -> dict[str, int]:
    return {"completed": outcome.completed, "failed": outcome.failed, "warning": outcome.warning}


# Seconds to wait for a destination's answer to one C-STORE. Also the bound on noticing a destination
# that aborts while an answer is awaited (pynetdicom does not always wake the waiting send at once).
SEND_DIMSE_TIMEOUT = 120


def _store_files(settings: Settings, node: move.Node, paths: list[Any], study_uid: str) -> dict[str, int]:
    """C-STORE the spooled files to ``node`` on one association (the spool half of a C-MOVE)."""
    from pynetdicom import AE

    ae = AE(ae_title=settings.ae_title)
    ae.requested_contexts = move.sub_operation_contexts(paths)
    ae.acse_timeout = 30
    ae.dimse_timeout = SEND_DIMSE_TIMEOUT
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        log.warning("send study %s: cannot associate with %s at %s:%d", study_uid, node.ae_title, node.host, node.port)
        where = f"{node.ae_title} at {node.host}:{node.port}"
        raise SendError(502, f"{where} did not accept the association (not listening, or refused)")
    counts = {"completed": 0, "failed": 0, "warning": 0}

    def dropped(n: int, why: object) -> SendError:
        counts["failed"] += len(paths) - n
        log.warning("send study %s: association with %s lost (%s); %s", study_uid, node.ae_title, why, counts)
        return SendError(
            502, f"{node.ae_title} dropped the association: {counts['completed']} of {len(paths)} image(s) sent"
        )

    try:
        for n, path in enumerate(paths):
            if not assoc.is_established:  # aborted by the destination (or on a timeout) after the last one
                raise dropped(n, "aborted")
            try:
                status = assoc.send_c_store(move.read_for_sending(path))
            except ValueError as exc:  # no presentation context the destination accepted for this file
                counts["failed"] += 1
                log.warning("send study %s: %s takes no context for %s (%s)", study_uid, node.ae_title, path.stem, exc)
                continue
            except RuntimeError as exc:  # the association was aborted or lost
                raise dropped(n, exc) from exc
            if status is None or "Status" not in status:  # no answer: aborted or timed out meanwhile
                raise dropped(n, "no answer")
            code = int(status.Status)
            if code == st.SUCCESS:
                counts["completed"] += 1
            elif code in (st.STORE_COERCION_OF_ELEMENTS, st.STORE_ELEMENTS_DISCARDED) or (code & 0xF000) == 0xB000:
                counts["warning"] += 1
            else:
                counts["failed"] += 1
                log.warning("send study %s: %s refused %s (%#06x)", study_uid, node.ae_title, path.stem, code)
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("sent study %s to %s from the spool: %s", study_uid, node.ae_title, counts)
    if counts["failed"] and not counts["completed"]:
        raise SendError(502, f"{node.ae_title} refused every image ({counts['failed']})")
    return counts


def routes(ctx: Any) -> list[Route]:
    async def send(request: Request) -> Response:
        study_uid = request.path_params["study_uid"]
        if not is_uid(study_uid):
            return JSONResponse({"error": "not a DICOM UID"}, status_code=400)
        try:
            body = await request.json()
            destination = str(body.get("destination", "")).strip()
        except (ValueError, AttributeError):
            destination = None
        if not destination:
            return JSONResponse({"error": 'the body is JSON {"destination": "<AE title>"}'}, status_code=400)
        try:
            outcome = await run_in_threadpool(send_study, ctx.settings, ctx.store, study_uid, destination)
        except SendError as err:
            return JSONResponse({"error": err.reason}, status_code=err.status)
        return JSONResponse({"study_instance_uid": study_uid, "destination": destination, **outcome})

    return [Route("/api/studies/{study_uid}/move", send, methods=["POST"])]
