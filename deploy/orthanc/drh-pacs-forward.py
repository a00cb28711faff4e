"""drh-pacs forwarder: an Orthanc Python plugin (Debian package ``orthanc-python``).

Every stable study goes to drh-pacs with a C-STORE job, and nothing is reported as forwarded unless
drh-pacs answered every instance with success:

- A stable study is first written to a small SQLite file (``DrhPacs`` > ``StateFile``), so a study
  Orthanc has announced is on record before anything is sent, and survives a restart of Orthanc.
- A sender thread sends each pending study as an Orthanc job (``/modalities/{m}/store``), waits for
  the job's end and reads its ``ErrorDetails``: Orthanc's REST calls from a plugin only raise an
  error code, and a "permissive" job reports no failed instance even when drh-pacs refused one.
- A study announced stable again while it is being sent (a series came meanwhile; Orthanc fixed the
  running job's instances when it created it) stays pending and is sent again at once.
- drh-pacs unreachable, the association rejected, or drh-pacs out of resources (0xA7xx): the study
  stays pending and is tried again with an exponential back-off (``RetryFirstSeconds`` doubling up
  to ``RetryMaxSeconds``); while drh-pacs is unreachable, nothing else is tried either. A store job
  paused in Orthanc, or whose progress has not moved for 15 minutes (then cancelled), is given up and
  its study tried again later; the other studies go on.
- drh-pacs refused the data (any other failure status): the study's instances are sent one by one
  and each refused instance is recorded with the status (drh-pacs lists it with its reason:
  ``drh-pacs failures list``); the rest of the study is sent.
- The association dropped while drh-pacs still answers a C-ECHO: it is this study, not the link, so
  it is sent one instance at a time too, and the rest of it gets through. An instance that drops the
  association again 5 s later is recorded as refused ("association aborted") when its file is over
  ``MaxDatasetSize`` (drh-pacs's ``DRH_MAX_DATASET_SIZE``, on which drh-pacs aborts); before, the
  whole study was sent again every 10 minutes for ever. One under it stays pending, and only it is
  tried again, with the back-off (the other studies go on): a timeout or the network, which
  drh-pacs's log or ``drh-pacs status`` tells apart.
- ``POST /drh-pacs/resend`` with an Orthanc study ID as the body sends a study again (after raising
  drh-pacs's limit, say); what its send finds replaces the study's refused instances.
- ``GET /drh-pacs/forwarding`` (Orthanc's REST API, with its authentication) lists what is
  pending, what was refused and why (as the study's latest send found them);
  Orthanc's ``/tools/metrics-prometheus`` carries ``drh_pacs_forward_pending`` and
  ``drh_pacs_forward_refused_instances``.

At start the plugin declares drh-pacs to Orthanc as two DICOM modalities, ``DRHPACS`` (storage,
C-MOVE) and ``SIMILAR`` (similar-studies queries from Orthanc Explorer and the REST API), from the
``DrhPacs`` section of ``drh-pacs.json``; the site's own ``DicomModalities`` stay as they are.

Log lines carry Orthanc identifiers (hashes) and DICOM statuses only, never patient data. The words
"forwarded to" appear only for a study every instance of which drh-pacs accepted.
"""

import json
import os
import re
import sqlite3
import threading
import time

import orthanc

DEFAULTS = {
    "Host": "drh-pacs.example.org",  # where drh-pacs's DICOM listener runs
    "Port": 11112,
    "Aet": "DRHPACS",  # drh-pacs's AE title (DRH_AE_TITLE)
    "SimilarAet": "SIMILAR",  # its similar-query AE title (DRH_SIMILAR_AE_TITLE)
    "Modality": "DRHPACS",  # the names of the two modalities in Orthanc
    "SimilarModality": "SIMILAR",
    "DeclareModalities": True,  # False: the site declares both in its own DicomModalities
    "RetryFirstSeconds": 10,
    "RetryMaxSeconds": 600,
    "MaxDatasetSize": 2 * 1024**3,  # drh-pacs's DRH_MAX_DATASET_SIZE: it aborts on a larger instance
    "StateFile": "",  # empty: drh-pacs-forward.sqlite beside Orthanc's index directory
}

# Failures that say nothing about the data: drh-pacs (or the network to it) is down, refuses the
# association, or is out of resources. Everything else is drh-pacs refusing the data itself.
LINK_ERRORS = re.compile(
    r"TCP Initialization Error|Association Rejected|Association Request Failed|Peer Aborted|Peer aborted|"
    r"Network Timeout|timeout|Timeout|Connection refused|Connection reset|Connection closed|DUL ",
)
# Of those, the association dropped midway: drh-pacs aborts on a dataset it will not take (over its
# DRH_MAX_DATASET_SIZE). Rejected associations (busy) and refused connections (down) are not.
DROPPED = re.compile(r"Peer [Aa]borted")
DIMSE_STATUS = re.compile(r"DIMSE status 0x([0-9A-Fa-f]{4})")
# Orthanc's error codes for a resource that does not exist (deleted meanwhile): InexistentItem, and
# UnknownResource, which Orthanc (1.10, Debian's) answers when a store job names a study it no longer has.
GONE = (7, 17)
# An Orthanc identifier (a SHA-1 of the UIDs, in five groups of eight hexadecimal digits).
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")
# An instance over MaxDatasetSize on which drh-pacs drops the association: refused so.
ABORTED = "association aborted"
# Orthanc's words when the peer took no presentation context for an instance's class or syntax.
NO_CONTEXT = re.compile(r"transcode|presentation context", re.IGNORECASE)
# Before sending again an instance on which the association dropped (a glitch of the network passes).
DROPPED_RETRY_SECONDS = 5
POLL_SECONDS = 0.2
# A store job whose progress has not moved for this long is cancelled, and its study tried again later
# (a study of thousands of images over a slow link moves every few seconds).
JOB_STALL_SECONDS = 900


def _settings():
    config = json.loads(orthanc.GetConfiguration())
    drh = dict(DEFAULTS)
    drh.update(config.get("DrhPacs") or {})
    if not drh["StateFile"]:
        index = (config.get("IndexDirectory") or config.get("StorageDirectory") or "OrthancStorage").rstrip("/")
        drh["StateFile"] = os.path.join(os.path.dirname(index) or ".", "drh-pacs-forward.sqlite")
    return drh, "DrhPacs" in config


class State:
    """The durable record: pending studies, refused instances, a count of forwarded studies."""

    def __init__(self, path):
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a study announced is on disk before we move on
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS pending (
                study TEXT PRIMARY KEY, queued REAL, attempts INTEGER DEFAULT 0,
                next_try REAL, last_error TEXT DEFAULT '');
            CREATE TABLE IF NOT EXISTS refused (
                instance TEXT PRIMARY KEY, study TEXT, status TEXT, details TEXT, at REAL);
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER);
            """
        )
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(pending)")}
        if "announced" not in columns:  # a state file of the previous release
            self.db.execute("ALTER TABLE pending ADD COLUMN announced INTEGER DEFAULT 0")
        if "left_for_later" not in columns:  # instances a partial send left (JSON list; '': the whole study)
            self.db.execute("ALTER TABLE pending ADD COLUMN left_for_later TEXT DEFAULT ''")

    def add(self, study):
        """A study announced stable (again): each announcement is counted, so that a send started
        before it does not take the study off the record (Orthanc fixes a store job's instances when
        it creates the job: images that came since are not in it)."""
        now = time.time()
        with self.lock:
            self.db.execute(
                "INSERT INTO pending (study, queued, next_try, announced) VALUES (?, ?, ?, 0) "
                "ON CONFLICT(study) DO UPDATE SET next_try = MIN(next_try, excluded.next_try),"
                " announced = announced + 1, left_for_later = ''",  # new images: the whole study again
                (study, now, now),
            )

    def due(self, now):
        """The study to send next, (study, attempts, announcements, instances left for later): the one
        waiting longest for its turn (new studies in arrival order; after a failure a study goes
        behind the others, so each gets its attempts)."""
        with self.lock:
            row = self.db.execute(
                "SELECT study, attempts, announced, left_for_later FROM pending WHERE next_try <= ?"
                " ORDER BY next_try, queued LIMIT 1",
                (now,),
            ).fetchone()
        return None if row is None else (*row[:3], json.loads(row[3]) if row[3] else [])

    def next_due(self):
        with self.lock:
            row = self.db.execute("SELECT MIN(next_try) FROM pending").fetchone()
        return row[0]

    def failed(self, study, attempts, next_try, error, left=None, refused=None, announced=0, partial=False):
        """A send that failed: tried again at ``next_try``. ``left``: the instances a send one by one
        could not send (only they are sent next time, unless the study was announced again since the
        send began: ``announced``); ``refused``: what that send found refused, which replaces the
        study's earlier refusals (is added to them, for a ``partial`` send)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "UPDATE pending SET attempts = ?, next_try = ?, last_error = ? WHERE study = ?",
                (attempts, next_try, error[:500], study),
            )
            if left is not None:
                self.db.execute(
                    "UPDATE pending SET left_for_later = ? WHERE study = ? AND announced <= ?",
                    (json.dumps(left), study, announced),
                )
            if refused is not None:
                (self._add_refused if partial else self._replace_refused)(study, refused)
            self.db.execute("COMMIT")

    def refused_in(self, study):
        with self.lock:
            return self.db.execute("SELECT instance, status, details FROM refused WHERE study = ?", (study,)).fetchall()

    def _replace_refused(self, study, refused):
        # a send's refusals replace the study's earlier ones (an instance corrected since is refused
        # no more; a study forwarded whole has none)
        self.db.execute("DELETE FROM refused WHERE study = ?", (study,))
        self._add_refused(study, refused)

    def _add_refused(self, study, refused):
        for instance, status, details in refused:
            self.db.execute(
                "INSERT OR REPLACE INTO refused VALUES (?, ?, ?, ?, ?)",
                (instance, study, status, details[:500], time.time()),
            )

    def done(self, study, announced, refused=(), forwarded=False, partial=False):
        """The send that began after ``announced`` announcements ended; returns False when the study
        was announced again meanwhile: it stays pending, to be sent again at once. ``partial``: a send
        of the instances an earlier one left, whose refusals it adds to that one's."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            gone = self.db.execute(
                "DELETE FROM pending WHERE study = ? AND announced <= ?", (study, announced)
            ).rowcount
            if not gone:
                self.db.execute("UPDATE pending SET attempts = 0, last_error = '' WHERE study = ?", (study,))
            if partial:
                self._add_refused(study, refused)
            else:
                self._replace_refused(study, refused)
            if forwarded:
                self.db.execute(
                    "INSERT INTO counters VALUES ('forwarded', 1) ON CONFLICT(name) DO UPDATE SET value = value + 1"
                )
            self.db.execute("COMMIT")
        return bool(gone)

    def report(self, limit=1000):
        with self.lock:
            pending = self.db.execute(
                "SELECT study, queued, attempts, next_try, last_error FROM pending ORDER BY queued LIMIT ?", (limit,)
            ).fetchall()
            refused = self.db.execute(
                "SELECT instance, study, status, details, at FROM refused ORDER BY at DESC LIMIT ?", (limit,)
            ).fetchall()
            counts = [self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("pending", "refused")]
            forwarded = self.db.execute("SELECT value FROM counters WHERE name = 'forwarded'").fetchone()
        keys_p = ("study", "queued", "attempts", "next_try", "last_error")
        keys_r = ("instance", "study", "status", "details", "at")
        return {
            "pending_count": counts[0],
            "refused_count": counts[1],
            "forwarded_count": forwarded[0] if forwarded else 0,
            "pending": [dict(zip(keys_p, row, strict=True)) for row in pending],
            "refused": [dict(zip(keys_r, row, strict=True)) for row in refused],
        }


class Outcome:
    def __init__(self, ok, details="", transient=False, status="", link=True):
        self.ok = ok
        self.details = details
        self.transient = transient  # worth trying again later (the link, drh-pacs busy)
        self.status = status  # the DIMSE status drh-pacs answered, when there was one
        self.link = link  # a transient failure of the link to drh-pacs: nothing else is tried meanwhile


def _status_words(status):
    return f"DIMSE status {status}" if status.startswith("0x") else status


def _classify(details):
    match = DIMSE_STATUS.search(details)
    status = ("0x" + match.group(1).upper()) if match else ""
    if status.startswith("0xA7"):
        return Outcome(False, details, transient=True, status=status)  # out of resources: later
    if LINK_ERRORS.search(details) and not status:
        return Outcome(False, details, transient=True)
    return Outcome(False, details, transient=False, status=status)


class Forwarder:
    AGAIN = "; announced stable again meanwhile: sent again for the images that came since"

    def __init__(self, drh, state):
        self.drh = drh
        self.state = state
        self.modality = drh["Modality"]
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.link_delay = 0.0  # while drh-pacs is unreachable: the current back-off
        self.paused_until = 0.0  # nothing is sent before this time (drh-pacs unreachable)
        self.link_error = ""
        self.last_success = 0.0
        self.thread = threading.Thread(target=self.run, name="drh-pacs-forward", daemon=True)

    # -- sending ---------------------------------------------------------------------------------
    def _store(self, resource):
        """One store job for a study or an instance; returns an Outcome once the job has ended."""
        body = json.dumps({"Resources": [resource], "Synchronous": False, "Permissive": False})
        try:
            job = json.loads(orthanc.RestApiPost(f"/modalities/{self.modality}/store", body))["ID"]
        except orthanc.OrthancException as exc:
            code = exc.args[0] if exc.args else None
            if code in GONE:
                return Outcome(False, "deleted from Orthanc", transient=False, status="gone")
            return Outcome(False, f"cannot start the store job: {exc}", transient=True)
        progress, moved_at = None, time.time()
        while not self.stop.is_set():
            try:
                info = json.loads(orthanc.RestApiGet("/jobs/" + job))
            except orthanc.OrthancException as exc:
                return Outcome(False, f"store job {job} vanished: {exc}", transient=True)
            state = info.get("State")
            if state == "Success":
                return Outcome(True, str(info.get("Content", {}).get("InstancesCount", "")))
            if state == "Failure":
                return _classify(str(info.get("ErrorDetails") or info.get("ErrorDescription") or "failed"))
            if info.get("Progress") != progress:
                progress, moved_at = info.get("Progress"), time.time()
            if state == "Paused":
                # paused by someone in Orthanc: theirs to resume; the study is tried again later
                return Outcome(False, f"store job {job} paused in Orthanc", transient=True, link=False)
            if time.time() - moved_at > JOB_STALL_SECONDS:
                # no progress for that long: every other study waits behind it
                try:
                    orthanc.RestApiPost(f"/jobs/{job}/cancel", "")
                except orthanc.OrthancException:
                    pass  # ended meanwhile
                return Outcome(False, f"store job {job} made no progress in {JOB_STALL_SECONDS} s", transient=True,
                               link=False)  # fmt: skip
            time.sleep(POLL_SECONDS)
        return Outcome(False, "Orthanc is stopping", transient=True)

    def _instance_by_instance(self, study, only=()):
        """Send each instance of the study (or only those named) alone: (sent, [(instance, status,
        details)], the failure that stops the study for now or None, [instances left for later])."""
        instances = list(only)
        if not instances:
            try:
                instances = [i["ID"] for i in json.loads(orthanc.RestApiGet(f"/studies/{study}/instances"))]
            except orthanc.OrthancException as exc:
                return 0, [], Outcome(False, f"cannot list the study's instances: {exc}", transient=True), []
        sent, refused, later, left = 0, [], None, []
        for instance in instances:
            outcome = self._store(instance)
            if self._dropped_by_drh_pacs(outcome):
                outcome = self._dropped_instance(instance, outcome)
                if outcome.transient and not outcome.link:  # this instance later; the others now
                    later = later or outcome
                    left.append(instance)
                    continue
            if outcome.ok:
                sent += 1
            elif outcome.status == "gone":
                continue
            elif outcome.transient:
                return sent, refused, outcome, []
            else:
                refused.append((instance, outcome.status or "refused", outcome.details))
        return sent, refused, later, left

    def _dropped_instance(self, instance, outcome):
        """drh-pacs dropped the association on this instance and still answers: sent once more a few
        seconds on (a glitch of the network passes); if it drops again, refused when its file is over
        drh-pacs's limit, else left for later (a timeout, the network: nothing says it is the
        instance's fault)."""
        if self.stop.wait(DROPPED_RETRY_SECONDS):
            return Outcome(False, "Orthanc is stopping", transient=True)
        again = self._store(instance)
        if again.ok or not self._dropped_by_drh_pacs(again):
            return again
        limit = int(self.drh["MaxDatasetSize"])
        try:
            size = int(json.loads(orthanc.RestApiGet(f"/instances/{instance}/attachments/dicom/size")))
        except (orthanc.OrthancException, ValueError):
            size = 0
        if size > limit:
            return Outcome(
                False,
                f"{again.details}; its file is {size} bytes, over drh-pacs's limit of {limit}"
                " (DRH_MAX_DATASET_SIZE on drh-pacs, MaxDatasetSize here): raise both, drh-pacs's last,"
                " then POST /drh-pacs/resend with the study",
                status=ABORTED,
            )
        return Outcome(
            False,
            f"{again.details} (twice, while drh-pacs answers a C-ECHO): drh-pacs's log or `drh-pacs status`"
            " says why (a PDU timeout, say); the study is tried again later",
            transient=True,
            link=False,
        )

    def _dropped_by_drh_pacs(self, outcome):
        """Whether the association dropped midway while drh-pacs still answers a C-ECHO: drh-pacs
        aborted on what was sent, the link is fine."""
        return outcome.transient and outcome.link and bool(DROPPED.search(outcome.details)) and self._echo()

    def _echo(self):
        try:
            orthanc.RestApiPost(f"/modalities/{self.modality}/echo", "{}")
            return True
        except orthanc.OrthancException:
            return False

    def _retry_delay(self, attempts):
        first = float(self.drh["RetryFirstSeconds"])
        return min(float(self.drh["RetryMaxSeconds"]), first * (2 ** max(0, attempts - 1)))

    def send(self, study, attempts, announced=0, left=()):
        """Send a pending study: whole, or only the instances an earlier send left (``left``)."""
        attempt = attempts + 1
        delay = self._retry_delay(attempt)  # before this study is tried again, if this attempt fails
        if not left:
            outcome = self._store(study)
            if outcome.ok:
                self._forwarded(study, announced, attempt, outcome.details)
                return
            if outcome.status == "gone":
                self.state.done(study, announced)
                orthanc.LogWarning(f"drh-pacs: study {study} was deleted from Orthanc before it could be sent")
                return
        if left or not outcome.transient or self._dropped_by_drh_pacs(outcome):
            # refused, or the association dropped while drh-pacs answers: one instance at a time
            sent, refused, transient, later = self._instance_by_instance(study, left)
            if transient is None:
                self._link_ok()
                earlier = self.state.refused_in(study) if left else []
                if not refused and not earlier:  # every instance taken: a glitch passed, or the ones left went
                    self._forwarded(
                        study, announced, attempt, f"{sent} more" if left else str(sent), partial=bool(left)
                    )
                    return
                last = self.state.done(study, announced, refused=refused, partial=bool(left))
                self._log_refused(study, refused + [tuple(r) for r in earlier], sent, last)
                return
            if later:
                self.state.failed(
                    study, attempt, time.time() + delay, transient.details,
                    left=later, refused=refused, announced=announced, partial=bool(left),
                )  # fmt: skip
                orthanc.LogWarning(
                    f"drh-pacs: study {study}: {sent} instance(s) sent, {len(later)} NOT sent to {self.modality}"
                    f" (attempt {attempt}): {transient.details}; only they are tried again, in {delay:.0f} s"
                )
                return
            outcome = transient
        self.state.failed(study, attempt, time.time() + delay, outcome.details)
        if outcome.link:  # drh-pacs or the network: nothing else is tried meanwhile
            self.link_error = outcome.details
            self.link_delay = min(float(self.drh["RetryMaxSeconds"]), max(self.link_delay * 2, self._retry_delay(1)))
            self.paused_until = time.time() + self.link_delay
        orthanc.LogWarning(
            f"drh-pacs: study {study} NOT sent to {self.modality} (attempt {attempt}): {outcome.details};"
            f" {self.state.report(0)['pending_count']} study(ies) pending,"
            f" next try in {(self.link_delay if outcome.link else delay):.0f} s"
        )

    def _forwarded(self, study, announced, attempt, instances, partial=False):
        last = self.state.done(study, announced, forwarded=True, partial=partial)
        self._link_ok()
        orthanc.LogWarning(
            f"drh-pacs: study {study} forwarded to {self.modality}"
            f" ({instances} instance(s), attempt {attempt})" + ("" if last else self.AGAIN)
        )

    def _log_refused(self, study, refused, sent, last):
        statuses = sorted({status for _, status, _ in refused})
        why = (
            " `drh-pacs failures refused` (or, for a SOP class it does not take, its log) says why"
            if any(status.startswith("0x") for status in statuses)
            else ""
        )
        if ABORTED in statuses:
            why += (";" if why else "") + (
                f" an instance over {self.drh['MaxDatasetSize']} bytes aborts the association (drh-pacs's"
                " DRH_MAX_DATASET_SIZE; `drh-pacs status` counts it, refused by admission control)"
            )
        # Refused before any DIMSE status: Orthanc's own words say why (no context for the class...).
        said = next((d for _, s, d in refused if not s.startswith("0x") and s != ABORTED and d), "")
        if said:
            why += (";" if why else "") + f" Orthanc: {said[:200]}"
            if NO_CONTEXT.search(said):
                why += (
                    " (drh-pacs accepted no presentation context for that SOP class or transfer syntax:"
                    " non-image objects under its DRH_NON_IMAGE_POLICY=reject, for one)"
                )
        orthanc.LogWarning(
            f"drh-pacs: study {study}: {len(refused)} instance(s) REFUSED by {self.modality}"
            f" ({', '.join(_status_words(s) for s in statuses)}), {sent} sent;"
            f" GET /drh-pacs/forwarding lists them" + (f";{why}" if why else "") + ("." if last else self.AGAIN)
        )

    def _link_ok(self):
        self.link_delay = 0.0
        self.paused_until = 0.0
        self.link_error = ""
        self.last_success = time.time()

    # -- the sender thread -----------------------------------------------------------------------
    def run(self):
        while not self.stop.is_set():
            try:
                self._metrics()
                pause = self.paused_until - time.time()
                if pause > 0:
                    # drh-pacs was unreachable: wait before touching it again (a new study does not
                    # shorten the wait; it is on record and goes with the others)
                    self.stop.wait(pause)
                    continue
                row = self.state.due(time.time())
                if row is None:
                    next_try = self.state.next_due()
                    wait = 60.0 if next_try is None else max(0.05, min(60.0, next_try - time.time()))
                    self.wake.wait(wait)
                    self.wake.clear()
                    continue
                self.send(*row)
            except Exception as exc:  # never let the thread die: log and go on
                orthanc.LogError(f"drh-pacs: forwarder error {exc!r}; going on")
                self.stop.wait(5)

    def _metrics(self):
        report = self.state.report(0)
        gauge = orthanc.MetricsType.DEFAULT
        orthanc.SetMetricsValue("drh_pacs_forward_pending", report["pending_count"], gauge)
        orthanc.SetMetricsValue("drh_pacs_forward_refused_instances", report["refused_count"], gauge)

    def declare_modalities(self):
        for name, aet in (
            (self.drh["Modality"], self.drh["Aet"]),
            (self.drh["SimilarModality"], self.drh["SimilarAet"]),
        ):
            body = {"AET": aet, "Host": self.drh["Host"], "Port": int(self.drh["Port"])}
            orthanc.RestApiPut("/modalities/" + name, json.dumps(body))
            orthanc.LogWarning(f"drh-pacs: modality {name} is {aet} at {body['Host']}:{body['Port']}")


FORWARDER = None


def _on_change(change_type, level, resource):
    if FORWARDER is None:
        return
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        FORWARDER.state.add(resource)
        FORWARDER._metrics()  # the sender may be waiting out a back-off: the gauge says it now
        FORWARDER.wake.set()
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        if FORWARDER.drh["DeclareModalities"]:
            try:
                FORWARDER.declare_modalities()
            except Exception as exc:  # the sender starts anyway: what is pending stays visible and retried
                orthanc.LogError(f"drh-pacs: could not declare the modalities ({exc!r}): check the DrhPacs section")
        FORWARDER.thread.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        FORWARDER.stop.set()
        FORWARDER.wake.set()


def _on_report(output, uri, **request):
    if request.get("method") != "GET":
        output.SendMethodNotAllowed("GET")
        return
    report = FORWARDER.state.report()
    report.update(
        modality=FORWARDER.modality,
        link_error=FORWARDER.link_error,
        link_retry_seconds=FORWARDER.link_delay,
        last_success=FORWARDER.last_success,
    )
    output.AnswerBuffer(json.dumps(report, indent=1), "application/json")


def _on_resend(output, uri, **request):
    """``POST /drh-pacs/resend`` (body: an Orthanc study ID): the study is pending again."""
    if request.get("method") != "POST":
        output.SendMethodNotAllowed("POST")
        return
    body = request.get("body") or b""
    study = (body.decode(errors="replace") if isinstance(body, bytes) else str(body)).strip()
    if not ORTHANC_ID.fullmatch(study):
        # not echoed: someone may have pasted a patient's name or ID
        orthanc.LogWarning(f"drh-pacs: resend asked with {len(study)} character(s) that are no Orthanc study ID")
        output.SendHttpStatusCode(400)
        return
    try:
        found = json.loads(orthanc.RestApiGet("/studies/" + study)).get("Type") == "Study"
    except orthanc.OrthancException:
        found = False
    if not found:
        orthanc.LogWarning(f"drh-pacs: resend asked for study {study}, which Orthanc does not have")
        output.SendHttpStatusCode(404)
        return
    FORWARDER.state.add(study)
    FORWARDER._metrics()
    FORWARDER.wake.set()
    orthanc.LogWarning(f"drh-pacs: study {study} to be sent again, as asked")
    output.AnswerBuffer(json.dumps({"pending": study}), "application/json")


def _start():
    global FORWARDER
    drh, configured = _settings()
    if not configured:
        orthanc.LogError(
            'drh-pacs: no "DrhPacs" section in the configuration (drh-pacs.json): NOTHING is forwarded to drh-pacs'
        )
        return
    FORWARDER = Forwarder(drh, State(drh["StateFile"]))
    orthanc.RegisterOnChangeCallback(_on_change)
    orthanc.RegisterRestCallback("/drh-pacs/forwarding", _on_report)
    orthanc.RegisterRestCallback("/drh-pacs/resend", _on_resend)
    pending = FORWARDER.state.report(0)["pending_count"]
    orthanc.LogWarning(
        f"drh-pacs: forwarding stable studies to {drh['Modality']} ({pending} pending from before,"
        f" state in {drh['StateFile']})"
    )


_start()
