"""delete-study and compact as IT staff run them, against a real Redis and the replica index."""

import time

import numpy as np
import pytest

from plugin.cli import main as cli
from plugin.search.replica import ReplicaIndex
from plugin.store import Store

VERSION = "m-test"


@pytest.fixture
def populated(redis_server, redis_client, tmp_path, monkeypatch):
    monkeypatch.setenv("DRH_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DRH_DATA_DIR", str(tmp_path / "data"))
    store = Store(redis_client)
    store.models.register(VERSION, 64)
    store.models.activate(VERSION)
    rng = np.random.default_rng(7)
    studies = {}
    for n in range(6):
        study = f"1.2.3.{n + 1}"
        sops = [f"{study}.{i + 1}" for i in range(2)]
        series = f"{study}.9"
        for sop in sops:
            store.records.put_instance(sop, study, {"modality": "DX", "series_uid": series})
            store.codes.upsert(VERSION, "image", sop, rng.integers(0, 256, 8, dtype=np.uint8), study_uid=study)
            spooled = tmp_path / "data" / "spool" / study / f"{sop}.dcm"
            spooled.parent.mkdir(parents=True, exist_ok=True)
            spooled.write_bytes(b"DICM")
        store.records.put_study(study, {"patient_id": f"P{n}", "study_date": "20240101", "modalities": "DX"})
        code = rng.integers(0, 256, 8, dtype=np.uint8)
        store.codes.upsert(VERSION, "study", study, code)
        store.codes.upsert(VERSION, "series", series, code, study_uid=study)
        store.records.link_series(study, [series])
        studies[study] = bytes(code)
    return store, studies, tmp_path / "data"


def _brute_force(studies: dict[str, bytes], query: bytes) -> list[tuple[int, str]]:
    q = np.frombuffer(query, np.uint8)
    return sorted((int(np.unpackbits(q ^ np.frombuffer(c, np.uint8)).sum()), uid) for uid, c in studies.items())


def test_deleted_study_is_gone_everywhere_and_compaction_keeps_answers_exact(populated, capsys):
    store, studies, data_dir = populated
    index = ReplicaIndex(store, "study")
    index.refresh()
    victim = "1.2.3.3"
    assert index.code_of(victim) is not None

    assert cli(["delete-study", victim]) == 0
    assert "4 code(s) tombstoned" in capsys.readouterr().out  # the study's, its series', its 2 images'
    assert store.records.study(victim) == {} and store.records.study_instances(victim) == []
    assert store.codes.get(VERSION, "study", victim) is None
    assert store.codes.get(VERSION, "series", f"{victim}.9") is None
    assert store.records.studies_of_series([f"{victim}.9", "1.2.3.4.9"]) == ["", "1.2.3.4"]
    assert store.codes.get(VERSION, "image", f"{victim}.1") is None
    assert not (data_dir / "spool" / victim).exists()
    assert (data_dir / "spool" / "1.2.3.4").exists()
    index.refresh()
    assert index.code_of(victim) is None
    del studies[victim]

    query = studies["1.2.3.1"]
    expected = _brute_force(studies, query)
    assert [(h.distance, h.uid) for h in index.search(query, k=10)] == expected

    assert cli(["compact"]) == 0
    out = capsys.readouterr().out
    assert f"{VERSION}/study: 1 slot(s) reclaimed" in out and f"{VERSION}/image: 2 slot(s) reclaimed" in out
    assert f"{VERSION}/series: 1 slot(s) reclaimed" in out
    index.refresh()
    assert sorted((h.distance, h.uid) for h in index.search(query, k=10)) == expected
    assert cli(["compact"]) == 0
    assert "nothing to compact" in capsys.readouterr().out


def test_delete_study_refuses_a_malformed_uid(populated, capsys):
    assert cli(["delete-study", "1.2.x"]) == 2
    assert "not valid UIDs" in capsys.readouterr().err


def test_delete_study_says_which_uids_it_did_not_know(populated, capsys):
    """A typo'd UID was reported "deleted 1 study(ies)" with status 0: IT would believe it gone."""
    store, _, data_dir = populated
    assert cli(["delete-study", "1.2.3.99"]) == 1
    out, err = capsys.readouterr()
    assert "deleted" not in out and "not known here, nothing deleted: 1.2.3.99" in err

    assert cli(["delete-study", "1.2.3.2", "1.2.3.98"]) == 1  # the known one goes, the other is named
    out, err = capsys.readouterr()
    assert "deleted 1 study(ies), 4 code(s)" in out and "1.2.3.98" in err and "1.2.3.2" not in err
    assert store.records.study("1.2.3.2") == {}
    assert cli(["delete-study", "1.2.3.2"]) == 1  # deleted already

    # a study only spooled (received, not yet indexed) is known: its files go
    (data_dir / "spool" / "1.2.3.77").mkdir()
    assert cli(["delete-study", "1.2.3.77"]) == 0
    assert not (data_dir / "spool" / "1.2.3.77").exists()


def test_models_lists_versions_and_drops_only_one_that_no_longer_answers(populated, capsys):
    store, studies, _ = populated
    old = "m-previous"
    store.models.register(old, 64)
    rng = np.random.default_rng(8)
    for study in studies:
        store.codes.upsert(old, "study", study, rng.integers(0, 256, 8, dtype=np.uint8))
        for sop in store.records.study_instances(study):
            store.codes.upsert(old, "image", sop, rng.integers(0, 256, 8, dtype=np.uint8))
            store.embeddings.put(old, sop, np.ones(4, np.float32), np.ones((27, 4), np.int8))

    assert cli(["models"]) == 0
    listing = capsys.readouterr().out.splitlines()
    active_line = next(line for line in listing if line.startswith(VERSION))
    old_line = next(line for line in listing if line.startswith(old))
    assert "(active)" in active_line and active_line.split()[3:5] == ["12", "6"]
    assert active_line.endswith("general (general: every image no other route takes)")  # registered without a route
    # image codes, study codes, embeddings, query variants
    assert old_line.split()[3:7] == ["12", "6", "12", "12"] and "(active)" not in old_line

    assert cli(["models", "drop", VERSION]) == 1
    assert "active version" in capsys.readouterr().err
    store.reindex.start(old, "", VERSION)
    store.reindex.update({"state": "running"})
    assert cli(["models", "drop", old]) == 1
    assert "re-index" in capsys.readouterr().err
    store.reindex.update({"state": "complete"})

    assert cli(["models", "drop", old]) == 0
    assert "12 image and 6 study code(s) removed" in capsys.readouterr().out
    assert store.models.versions() == [VERSION]
    assert not list(store.client.scan_iter(match=f"*{old}*"))
    # Later writes do not bring it back, and the active version still answers exactly.
    store.records.put_instance("1.2.3.1.9", "1.2.3.1", {"modality": "DX"})
    assert not list(store.client.scan_iter(match=f"*{old}*"))
    index = ReplicaIndex(store, "study")
    index.refresh()
    query = studies["1.2.3.2"]
    hits = index.search(query, 6)
    assert [(h.distance, h.uid) for h in hits] == _brute_force(studies, query)
    assert cli(["models", "drop", "no-such-version"]) == 1


def test_reindex_wait_without_a_terminal_prints_progress_lines_until_the_job_ends(store, capsys):
    """``reindex --wait`` in a log file or a systemd unit: plain lines as the job moves (a bar's
    carriage returns would make one line, seen only at the end), the last one the final state."""
    import threading

    from plugin.ops.reindex import follow_lines

    store.reindex.start("m9", "/models/m9.pt", "m8")
    steps = [{"state": "running", "total": 40, "done": 10}, {"done": 30}, {"state": "finishing", "done": 40}]

    def worker() -> None:
        for fields in steps:
            time.sleep(0.15)
            store.reindex.update(fields)
        time.sleep(0.15)
        store.reindex.update({"state": "done", "studies_done": 7})

    t = threading.Thread(target=worker)
    t.start()
    job = follow_lines(store.reindex.get, every=0.0, poll=0.02)
    t.join()
    assert job["state"] == "done"
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("re-index to m9") and ": planning, 0/0 instances" in lines[0]
    assert any(": running, 10/40 instances" in line for line in lines)
    assert any(": finishing, 40/40 instances" in line for line in lines)
    assert lines[-1].startswith("re-index to m9") and ": done, 40/40 instances" in lines[-1]
    assert "studies pooled 7" in lines[-1] and "\r" not in "".join(lines)
