"""Admission of DICOM connections: no idle, slow or oversized peer holds what others need.

pynetdicom's server gives every accepted TCP connection an association thread at once, counts it
against ``maximum_associations`` before a byte of its A-ASSOCIATE-RQ was read, reads each PDU with
a blocking ``recv`` that no timer interrupts, wraps TLS in the accepting thread (one silent TLS
client stopped every other handshake), and reads whatever PDU length a peer declares. So sixteen
idle sockets locked out every PACS and viewer, and one P-DATA-TF announcing 300 MB grew the process
by 100 MB. This module plugs into pynetdicom through the extension points its server offers (a
server class for :meth:`pynetdicom.AE.make_server` and its ``request_handler``), and changes four
things:

1. **Admission phase, per connection, off the accepting thread.** The accepting thread only
   accepts and counts *pending* connections (:data:`MAX_PENDING` in all, :data:`MAX_PENDING_PER_ADDRESS`
   from one address, the rest closed at once). Each connection's own thread then does the TLS
   handshake and reads the whole A-ASSOCIATE-RQ within ``Settings.dicom_request_timeout``, one
   deadline for both; a peer that is idle, half-sends its request or never says ClientHello is
   disconnected then. Only a complete request reaches pynetdicom.
2. **Slots for established associations only**: :meth:`Admission.take_slot` (called from the
   A-ASSOCIATE-RQ handler) counts associations admitted to negotiation, ``max_associations`` in all
   and ``max_associations_per_address`` per address; pending connections never take one.
3. **Every PDU read has a deadline** (``Settings.dicom_network_timeout`` from its first byte), so a
   peer that stops mid-PDU is aborted instead of holding its thread for ever.
4. **Sizes are bounded**: a PDU longer than the ``max_pdu_size`` we announced, an A-ASSOCIATE-RQ
   over :data:`MAX_REQUEST_PDU`, or a C-STORE dataset over ``max_dataset_size`` aborts the
   association (A-ABORT) before more is read.

Each refusal is counted by reason (:attr:`Admission.refusals`, every reason of
:data:`REFUSAL_REASONS` from zero; exported in ``/metrics`` as ``drh_dicom_admission_refusals_total``
through :mod:`plugin.dicom.counters`) and logged with the peer's address, at most once a minute per
reason and address (an attack must not flood the log).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from plugin.core.settings import Settings

log = logging.getLogger("drh.scp.admission")

# Connections accepted but not yet associated (TLS handshake, A-ASSOCIATE-RQ in flight). Each costs
# a thread for at most dicom_request_timeout; the caps bound threads and file descriptors (keeping
# them under 1024, since pynetdicom watches its sockets with select()), and the per-address one keeps
# a single host from taking them all.
MAX_PENDING = 512
MAX_PENDING_PER_ADDRESS = 64
# Why admission refused a connection or aborted an association (the counters' names).
REFUSAL_REASONS = (
    "too-many-pending",
    "request-timeout",
    "not-an-association-request",
    "request-too-large",
    "tls-failed",
    "connection-lost",
    "busy",
    "pdu-too-large",
    "pdu-timeout",
    "dataset-too-large",
)
# An A-ASSOCIATE-RQ proposing every storage SOP class with every transfer syntax is about 60 KB.
MAX_REQUEST_PDU = 1024 * 1024
# Other PDUs an acceptor receives (release, abort) are a few bytes; P-DATA-TF is bounded by
# max_pdu_size plus this slack, for peers that count the PDU header in the announced maximum.
PDU_SLACK = 64
# Refusals of one reason from one address are logged at most this often (with the count since).
LOG_EVERY_SECONDS = 60.0

A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
# A-ABORT (source, reason): service provider with "invalid PDU parameter value"; service user (the
# only reason allowed is "not specified") for a dataset we will not store; provider, not specified.
ABORT_BAD_PDU = (0x02, 0x06)
ABORT_BY_USER = (0x00, 0x00)
ABORT_PROVIDER = (0x02, 0x00)


class Refused(Exception):
    """A connection closed during admission; ``reason`` is its counter's name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    request_timeout: float
    pdu_timeout: float
    max_pdu: int
    max_dataset: int
    max_associations: int
    max_per_address: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            request_timeout=settings.dicom_request_timeout,
            pdu_timeout=settings.dicom_network_timeout,
            max_pdu=settings.max_pdu_size,
            max_dataset=settings.max_dataset_size,
            max_associations=settings.max_associations,
            max_per_address=settings.max_associations_per_address,
        )


class Refusals:
    """Counts of refused connections and associations by reason, with rate-limited warnings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter(dict.fromkeys(REFUSAL_REASONS, 0))
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    def count(self, reason: str, address: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._counts[reason] += 1
            last, skipped = self._logged.get((reason, address), (float("-inf"), 0))
            if now - last < LOG_EVERY_SECONDS:
                self._logged[(reason, address)] = (last, skipped + 1)
                return
            self._logged[(reason, address)] = (now, 0)
        more = f" ({skipped} more like it in the last minute)" if skipped else ""
        log.warning("DICOM connection from %s refused (%s): %s%s", address, reason, detail, more)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Admission:
    """The counts and limits one SCP shares between its accepting thread and its connections."""

    def __init__(self, limits: Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self.limits = limits
        self.ssl_context = ssl_context
        self.refusals = Refusals()
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._slots: dict[Any, str] = {}  # association -> peer address

    # -- pending connections (accepting thread, then the connection's own thread) -----------------
    def try_pending(self, address: str) -> bool:
        with self._lock:
            total = sum(self._pending.values())
            if total >= MAX_PENDING or self._pending[address] >= MAX_PENDING_PER_ADDRESS:
                busy = True
            else:
                self._pending[address] += 1
                busy = False
        if busy:
            self.refusals.count("too-many-pending", address, "too many connections still negotiating")
        return not busy

    def pending_done(self, address: str) -> None:
        with self._lock:
            self._pending[address] -= 1
            if self._pending[address] <= 0:
                del self._pending[address]

    def pending(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def admit(self, conn: socket.socket, address: str) -> tuple[socket.socket, bytes]:
        """TLS handshake (when configured) and the whole A-ASSOCIATE-RQ, within one deadline.

        Returns the socket to use (the TLS one, if any) and the request's bytes, which the
        association reads before anything else from the socket. Raises :class:`Refused`.
        """
        deadline = time.monotonic() + self.limits.request_timeout
        if self.ssl_context is not None:
            conn = _handshake(self.ssl_context, conn, deadline)
        header = _recv_exactly(conn, 6, deadline, "A-ASSOCIATE-RQ")
        kind, length = struct.unpack(">BxL", header)
        if kind != A_ASSOCIATE_RQ:
            hint = " (a TLS client on a plain port?)" if kind == 0x16 else ""
            raise Refused("not-an-association-request", f"first PDU type {kind:#04x}, not A-ASSOCIATE-RQ{hint}")
        if length > MAX_REQUEST_PDU:
            raise Refused("request-too-large", f"A-ASSOCIATE-RQ of {length} bytes (at most {MAX_REQUEST_PDU})")
        body = _recv_exactly(conn, length, deadline, "A-ASSOCIATE-RQ")
        conn.settimeout(self.limits.pdu_timeout)  # sends too: a peer that stops reading is cut off
        return conn, header + body

    # -- association slots (the A-ASSOCIATE-RQ handler) ------------------------------------------
    def take_slot(self, assoc: Any, address: str) -> str | None:
        """Register an association about to be negotiated; the reason it may not, or None."""
        with self._lock:
            live = {a: addr for a, addr in self._slots.items() if _holds_slot(a)}
            self._slots = live
            if len(live) >= self.limits.max_associations:
                reason = f"all {self.limits.max_associations} association slots in use"
            elif sum(addr == address for addr in live.values()) >= self.limits.max_per_address:
                reason = f"{self.limits.max_per_address} associations already open from this address"
            else:
                self._slots[assoc] = address
                return None
        self.refusals.count("busy", address, reason)
        return reason

    def established(self) -> int:
        with self._lock:
            return sum(_holds_slot(a) for a in self._slots)


def _holds_slot(assoc: Any) -> bool:
    return bool(assoc.is_alive() and not (assoc.is_released or assoc.is_aborted or assoc.is_rejected))


def _wait(sock: socket.socket, deadline: float, write: bool, what: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Refused("request-timeout", f"{what} not complete in time")
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    if not poller.poll(remaining * 1000):
        raise Refused("request-timeout", f"{what} not complete in time")


def _handshake(context: ssl.SSLContext, conn: socket.socket, deadline: float) -> socket.socket:
    """The server side of the TLS handshake, non-blocking, so the deadline holds however the peer
    trickles its bytes."""
    conn.setblocking(False)
    try:
        tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        raise Refused("tls-failed", f"TLS set-up failed: {exc}") from exc
    while True:
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            _wait(tls, deadline, False, "TLS handshake")
        except ssl.SSLWantWriteError:
            _wait(tls, deadline, True, "TLS handshake")
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise Refused("tls-failed", f"TLS handshake failed: {reason}") from exc


def _recv_exactly(conn: socket.socket, n: int, deadline: float, what: str) -> bytes:
    data = bytearray()
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refused("request-timeout", f"{what} not complete in time ({len(data)} of {n} bytes)")
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(min(n - len(data), 65536))
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except OSError as exc:
            raise Refused("connection-lost", f"connection lost during {what}: {exc}") from exc
        if not chunk:
            raise Refused("connection-lost", f"closed during {what} ({len(data)} of {n} bytes)")
        data += chunk
    return bytes(data)


class GuardedAssociationSocket(AssociationSocket):
    """pynetdicom's socket with the admitted request in front, and a deadline and size limit on
    every PDU read after it.

    The DUL reads a PDU as ``recv(6)`` (type and length) then ``recv(length)``; so a read while no
    body is expected is a header. Returning fewer bytes than asked is how the DUL learns that the
    connection is gone (it then closes it), so a refusal sends an A-ABORT and returns nothing.
    """

    def __init__(
        self, assoc: Any, client_socket: socket.socket, preread: bytes, admission: Admission, address: str
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._preread = bytearray(preread)
        self._admission = admission
        self._address = address
        self._body: tuple[int, int, float] | None = None  # (PDU type, length, deadline) of the body to come
        self._dataset_bytes = 0  # of the DIMSE message being received

    @property
    def ready(self) -> bool:
        return bool(self._preread) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        limits = self._admission.limits
        if self._body is None:
            deadline = time.monotonic() + limits.pdu_timeout
            data = self._read(nr_bytes, deadline)
            if len(data) == 6 and nr_bytes == 6:
                kind, length = struct.unpack(">BxL", data)
                limit = limits.max_pdu + PDU_SLACK if kind == P_DATA_TF else MAX_REQUEST_PDU
                if length > limit:
                    return self._refuse(
                        "pdu-too-large", f"PDU type {kind:#04x} of {length} bytes (limit {limit})", ABORT_BAD_PDU
                    )
                self._body = (kind, length, deadline)
            return data
        kind, length, deadline = self._body
        self._body = None
        data = self._read(nr_bytes, deadline)
        if kind == P_DATA_TF and len(data) == length and not self._count_dataset(data):
            return self._refuse(
                "dataset-too-large", f"dataset over max_dataset_size ({limits.max_dataset} bytes)", ABORT_BY_USER
            )
        return data

    def _read(self, nr_bytes: int, deadline: float) -> bytearray:
        out = bytearray()
        if self._preread:
            out += self._preread[:nr_bytes]
            del self._preread[:nr_bytes]
        sock = self.socket
        while len(out) < nr_bytes and sock is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._refuse(
                    "pdu-timeout", f"PDU not received within {self._admission.limits.pdu_timeout:.0f} s", ABORT_PROVIDER
                )
            try:
                sock.settimeout(remaining)
                chunk = sock.recv(min(nr_bytes - len(out), 65536))
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                return out  # the DUL sees a short read: connection closed
            finally:
                if self.socket is not None:
                    sock.settimeout(self._admission.limits.pdu_timeout)
            if not chunk:
                return out
            out += chunk
        return out

    def _count_dataset(self, pdu_body: bytes) -> bool:
        """Add the P-DATA-TF's dataset fragments to the message's total; False once it is over."""
        view = memoryview(pdu_body)
        pos = 0
        while pos + 6 <= len(view):
            item_length = int.from_bytes(view[pos : pos + 4], "big")
            control = view[pos + 5]
            if not control & 0x01:  # a dataset fragment (bit 0 clear), not a command
                self._dataset_bytes += max(0, item_length - 2)
                if self._dataset_bytes > self._admission.limits.max_dataset:
                    return False
                if control & 0x02:  # its last fragment: the next message starts from zero
                    self._dataset_bytes = 0
            pos += 4 + item_length
        return True

    def _refuse(self, reason: str, detail: str, abort: tuple[int, int]) -> bytearray:
        calling = str(getattr(self.assoc.requestor, "ae_title", "") or "").strip()
        self._admission.refusals.count(reason, self._address, f"{detail} (calling AE {calling or '?'})")
        sock = self.socket
        if sock is not None:
            try:
                sock.settimeout(1.0)
                sock.sendall(struct.pack(">BxLxxBB", 0x07, 4, *abort))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return bytearray()


def discard_unfinished_dataset(event: Any) -> None:
    """``EVT_CONN_CLOSE`` handler: remove the temporary file of a C-STORE dataset the closing cut off
    (a refusal above, a peer gone mid-transfer); nobody will finish it, and pynetdicom deletes only
    the files of complete requests. Unlinked, not closed: the association's thread may still be
    writing its last queued fragment."""
    message = getattr(getattr(event.assoc, "dimse", None), "message", None)
    path = getattr(message, "_data_set_path", None)  # pynetdicom's chunked-dataset file
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


class AdmissionRequestHandler(RequestHandler):
    """Runs in the connection's own thread: admission first, then the association as pynetdicom
    would start it (:meth:`_create_association` follows pynetdicom 3.0's, with our socket)."""

    server: AdmissionServer

    def handle(self) -> None:
        admission = self.server.admission
        address = str(self.client_address[0])
        conn: socket.socket = self.request
        try:
            try:
                conn, preread = admission.admit(conn, address)
            finally:
                admission.pending_done(address)
        except Refused as exc:
            admission.refusals.count(exc.reason, address, exc.detail)
            self.server.shutdown_request(conn)
            if conn is not self.request:
                self.server.shutdown_request(self.request)
            return
        assoc = self._create_association(conn, preread, address)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()

    def _create_association(self, conn: socket.socket, preread: bytes, address: str) -> Any:  # type: ignore[override]
        from pynetdicom.association import Association

        assoc = Association(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server  # pynetdicom finds its acceptors by this (active_associations)
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(GuardedAssociationSocket(assoc, conn, preread, self.server.admission, address))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server.get_events():
            handlers = self.server.get_handlers(event)
            if event.is_intervention:
                if handlers and handlers[0] is not None:
                    assoc.bind(event, *handlers)
            else:
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        return assoc


class AdmissionServer(ThreadedAssociationServer):
    """pynetdicom's threaded server whose accepting thread only accepts: TLS and the request are
    read in the connection's thread (:class:`AdmissionRequestHandler`)."""

    daemon_threads = True
    # Connections the kernel queues before the accepting thread takes them (socketserver's default,
    # 5, drops a burst of modalities connecting at once into SYN retries of a second or more).
    request_queue_size = 128

    def __init__(self, *args: Any, admission: Admission, **kwargs: Any) -> None:
        self.admission = admission
        super().__init__(*args, request_handler=AdmissionRequestHandler, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = self.socket.accept()  # no TLS here: a silent client would block every accept
        return conn, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.admission.try_pending(str(client_address[0]))
