"""Admission control of the SCP (plugin.dicom.admission) against real DCMTK peers and raw sockets:
idle, half-sent and silent-TLS connections do not lock anyone out, slots are per established
association, and every refusal is counted."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.dicomwire import associate_rq, closed_by_peer, read_pdu
from tests.helpers.peers import dcmtk, findscu, running_plugin
from tests.helpers.processes import wait_until
from tests.helpers.tls import certificates

pytestmark = pytest.mark.slow  # real DICOM peers, an SCP with its threads

ATTACKERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")  # other loopback addresses: other hosts to the SCP
REQUEST_TIMEOUT = 8.0
# DCMTK's own deadlines: connect, association and each DIMSE message must each take under 5 s.
QUICK = ["-to", "5", "-ta", "5", "-td", "5"]


@contextlib.contextmanager
def sockets(port: int, n: int, source: str, send: bytes = b"") -> Iterator[list[socket.socket]]:
    opened = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
            if send:
                s.sendall(send)
            opened.append(s)
        yield opened
    finally:
        for s in opened:
            s.close()


def _dcmtk_peers_succeed(port: int, tmp_path, tls: list[str]) -> None:
    study = make_study(tmp_path / "in", fixture_images("normal")[:1])
    echo = dcmtk("echoscu", *QUICK, *tls, "-aet", "VIEWER", "-aec", "DRHPACS", "127.0.0.1", str(port), timeout=30)
    assert echo.returncode == 0, echo.stderr
    store = dcmtk("storescu", *QUICK, *tls, "-aet", "PACS", "-aec", "DRHPACS", "127.0.0.1", str(port),
                  str(study.files[0]), timeout=30)  # fmt: skip
    assert store.returncode == 0, store.stderr
    find, _ = findscu(port, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID="], tmp_path / "rsp", extra=(*QUICK, *tls))
    assert find.returncode == 0, find.stderr


def test_idle_half_sent_and_silent_tls_connections_lock_nobody_out(tmp_path, redis_client, redis_server):
    certs = certificates(tmp_path / "certs")
    tls_settings = {
        "tls_cert": str(certs["server.crt"]),
        "tls_key": str(certs["server.key"]),
        "tls_ca": str(certs["ca.crt"]),
    }
    tls_client = ["+tls", str(certs["client.key"]), str(certs["client.crt"]), "+cf", str(certs["ca.crt"])]
    half = associate_rq("ATTACKER", "DRHPACS")[:-10]
    common = {"dicom_request_timeout": REQUEST_TIMEOUT, "max_associations": 4}
    with (
        running_plugin(tmp_path / "plain", redis_server.url, **common) as plain,
        running_plugin(tmp_path / "tls", redis_server.url, **common, **tls_settings) as tls,
    ):
        started = time.monotonic()
        with (
            sockets(plain.port, 50, ATTACKERS[0]) as idle,
            sockets(plain.port, 50, ATTACKERS[1], send=half) as half_sent,
            sockets(tls.port, 50, ATTACKERS[2]) as silent_tls,
        ):
            attack = idle + half_sent + silent_tls
            wait_until(lambda: plain.server.admission.pending() == 100 and tls.server.admission.pending() == 50, 10,
                       what="every attacking connection accepted and pending")  # fmt: skip
            _dcmtk_peers_succeed(plain.port, tmp_path / "p", [])
            _dcmtk_peers_succeed(tls.port, tmp_path / "t", tls_client)
            assert time.monotonic() - started < REQUEST_TIMEOUT  # so the attack was there all along:
            assert not any(closed_by_peer(s) for s in attack)
            # ...and the SCP disconnects every one of them at its deadline
            wait_until(lambda: all(closed_by_peer(s) for s in attack), REQUEST_TIMEOUT + 10, what="attack cut off")
        assert plain.server.admission.refusals.snapshot()["request-timeout"] == 100
        assert tls.server.admission.refusals.snapshot()["request-timeout"] == 50
        assert plain.server.admission.pending() == 0 and tls.server.admission.pending() == 0


def test_slots_are_for_established_associations_and_shared_fairly_between_addresses(
    tmp_path, redis_client, redis_server
):
    settings = {"max_associations": 3, "max_associations_per_address": 2}
    with running_plugin(tmp_path, redis_server.url, **settings) as plugin:
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(Verification)
        ae.acse_timeout = 5
        with sockets(plugin.port, 20, ATTACKERS[0]):  # pending connections take no slot
            first = ae.associate("127.0.0.1", plugin.port, ae_title="DRHPACS")
            second = ae.associate("127.0.0.1", plugin.port, ae_title="DRHPACS")
            try:
                assert first.is_established and second.is_established
                third = ae.associate("127.0.0.1", plugin.port, ae_title="DRHPACS")
                assert third.is_rejected  # a third one from the same address: busy
                assert third.acceptor.primitive.result == 0x02  # rejected-transient: try again later
                # another host still gets the last slot
                raw = socket.create_connection(("127.0.0.1", plugin.port), source_address=(ATTACKERS[1], 0))
                raw.sendall(associate_rq("OTHERHOST", "DRHPACS"))
                kind, _ = read_pdu(raw)
                assert kind == 0x02  # A-ASSOCIATE-AC
                raw.close()
            finally:
                first.release()
                second.release()
        wait_until(lambda: plugin.server.admission.established() == 0, 10, what="slots free again")
        assert plugin.server.admission.refusals.snapshot()["busy"] == 1


def test_too_many_pending_connections_from_one_address_are_closed_at_once(tmp_path, redis_client, redis_server):
    from plugin.dicom.admission import MAX_PENDING_PER_ADDRESS

    with (
        running_plugin(tmp_path, redis_server.url) as plugin,
        sockets(plugin.port, MAX_PENDING_PER_ADDRESS, ATTACKERS[0]),
    ):
        wait_until(lambda: plugin.server.admission.pending() == MAX_PENDING_PER_ADDRESS, 10, what="pending")
        with sockets(plugin.port, 1, ATTACKERS[0]) as (extra,):
            wait_until(lambda: closed_by_peer(extra), 5, what="the extra connection closed")
        assert plugin.server.admission.refusals.snapshot()["too-many-pending"] == 1
        ok = dcmtk("echoscu", *QUICK, "-aet", "VIEWER", "-aec", "DRHPACS", "127.0.0.1", str(plugin.port))
        assert ok.returncode == 0, ok.stderr


def test_a_tls_client_on_the_plain_port_and_garbage_are_refused_with_a_reason(tmp_path, redis_client, redis_server):
    with running_plugin(tmp_path, redis_server.url) as plugin:
        for payload in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET / HTTP/1.1\r\n\r\n"):
            with sockets(plugin.port, 1, "127.0.0.1", send=payload) as (s,):
                wait_until(lambda s=s: closed_by_peer(s), 5, what="refused")
        refusals = plugin.server.admission.refusals.snapshot()
        assert refusals["not-an-association-request"] == 2
