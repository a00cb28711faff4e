"""Raw DICOM upper-layer bytes, for tests that play a misbehaving peer on a plain socket."""

from __future__ import annotations

import socket
import struct

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def associate_rq(calling: str, called: str, abstract: str = VERIFICATION, max_pdu: int = 16384) -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU proposing one presentation context (id 1)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(abstract, [EXPLICIT_VR_LE])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def pdu_header(kind: int, length: int) -> bytes:
    return struct.pack(">BxL", kind, length)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU (type, body); (0, b"") when the peer closed the connection."""
    header = _exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    kind, length = struct.unpack(">BxL", header)
    return kind, _exactly(sock, length)


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed (or reset) the connection, without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
