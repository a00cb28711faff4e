"""The status page for IT staff: the figures of :func:`plugin.ops.status.gather` as HTML.

One function per section (queues, workers, ingest, index, failures), so a new figure goes in the
section it belongs to. Every value is escaped; a retry button is only written for a value that is a
UID (digits and dots), so nothing from the store reaches a script.
"""

from __future__ import annotations

import html
import time
from typing import Any

from plugin.core.header import is_uid
from plugin.ops import metrics, status
from plugin.store.stats import MODALITY_OUTCOMES

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>drh-pacs status</title>
<meta http-equiv="refresh" content="15">
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.2em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f0f0f0; }} .bad {{ color: #a00; font-weight: bold; }} .num {{ text-align: right; }}
</style></head><body>
<h1>drh-pacs status</h1><p>{when} &middot; namespace <code>{ns}</code> &middot; refreshes every 15 s
&middot; <a href="/similar">similar cases</a></p>
{body}
<script>
async function retry(uid) {{
  // The browser's session (the login cookie) first; a page opened with DRH_API_OPEN_READONLY and no
  // session asks for the API token, kept in this tab only.
  const url = "/api/failures/" + encodeURIComponent(uid) + "/retry";
  let r = await fetch(url, {{method: "POST", credentials: "same-origin"}});
  if (r.status === 401) {{
    let token = sessionStorage.getItem("drh-token") || prompt("API token");
    if (!token) return;
    r = await fetch(url, {{method: "POST", headers: {{"Authorization": "Bearer " + token}}}});
    if (r.ok) sessionStorage.setItem("drh-token", token); else sessionStorage.removeItem("drh-token");
  }}
  const j = await r.json(); alert(r.ok ? "re-queued " + (j.retried || 0) : (j.error || r.status));
  location.reload();
}}
</script></body></html>"""

e = html.escape


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _queues(f: dict[str, Any]) -> str:
    rows = [[e(q), f"<span class='num'>{n}</span>"] for q, n in f["queues"].items()]
    rows += [["in flight", f["in_flight"]], ["pending for the model", f["pending"]]]
    return "<h2>Queues</h2>" + _table(["queue", "waiting"], rows)


def _workers(f: dict[str, Any]) -> str:
    out = "<h2>Workers</h2>"
    if not any(w.get("state", "online") == "online" for w in f["workers"]):
        out += "<p class='bad'>No worker online: nothing will be indexed.</p>"
    if not f["workers"]:
        return out

    def state(w: dict[str, Any]) -> str:
        text = e(w.get("state", "online"))
        if w.get("state") in ("offline", "refused"):
            text = f"<span class='bad'>{text.upper()}</span>"
        return text + (f"<br>{e(w['reason'])}" if w.get("reason") else "")

    rows = [
        [
            e(w["hostname"]),
            state(w),
            e(w["device"]),
            w["concurrency"],
            e(",".join(w["queues"])),
            e(",".join(w.get("models", []))),
            f"{_when(float(w.get('last_seen', 0)))} ({w['age']:.0f} s ago)",
        ]
        for w in f["workers"]
    ]
    headers = ["worker", "state", "device", "processes", "queues", "models", "last seen"]
    return out + _table(headers, rows)


def _dicom(f: dict[str, Any]) -> str:
    """The DICOM listener (present in the process of ``serve``), the spool's disk and Orthanc."""
    out = ""
    d = f.get("dicom")
    if d:
        out += "<h2>DICOM</h2>"
        assoc = ", ".join(f"{e(k)} {v}" for k, v in d["associations"].items())
        rejected = ", ".join(f"{e(k)} {v}" for k, v in d["rejections"].items() if v) or "none"
        out += f"<p>{d['active_associations']} association(s) open; {assoc}; rejected by reason: {rejected}.</p>"
        admission = ", ".join(f"{e(k)} {v}" for k, v in d.get("admission_refusals", {}).items() if v) or "none"
        out += f"<p>Refused by admission control: {admission}.</p>"
        rows = []
        for op, lat in d["latency"].items():
            counts = {o: d["requests"][f"{op}|{o}"] for o in ("success", "warning", "failure", "cancel")}
            p50 = metrics.latency_quantile(lat, 0.5)
            p95 = metrics.latency_quantile(lat, 0.95)
            fail = f"<span class='bad'>{counts['failure']}</span>" if counts["failure"] else "0"
            times = f"&le; {p50:g} s / &le; {p95:g} s" if p50 is not None else ""
            rows.append([e(op), counts["success"], counts["warning"], fail, counts["cancel"], times])
        out += _table(["service", "success", "warning", "failure", "cancel", "median / 95th pct"], rows)
    spool = f.get("spool")
    if spool:
        if spool.get("ok"):
            pct = 100 * spool["free"] / max(1, spool["total"])
            cls = " class='bad'" if pct < 10 else ""
            out += (
                f"<p{cls}>Spool: {spool['free'] / 1e9:.1f} GB free of {spool['total'] / 1e9:.1f} GB ({pct:.0f} %).</p>"
            )
        else:
            out += f"<p class='bad'>Spool unreadable: {e(spool.get('error', ''))}</p>"
    orthanc = f.get("orthanc")
    if orthanc:
        if orthanc["up"]:
            out += f"<p>Orthanc <code>{e(orthanc['url'])}</code> answers."
        else:
            out += f"<p class='bad'>Orthanc <code>{e(orthanc['url'])}</code> is DOWN: {e(orthanc['error'])}."
        rec = orthanc.get("reconcile") or {}
        if rec.get("last_error"):
            out += f" <span class='bad'>Last reconciliation failed: {e(rec['last_error'])}</span>"
        elif rec.get("last_ok"):
            out += f" Last reconciliation: {_when(rec['last_ok'])}."
        out += "</p>"
    return out


def _ingest(f: dict[str, Any]) -> str:
    rows = [
        [e(t), e(status.outcome_label(o)), n]
        for t, outs in sorted(f["tasks"].items())
        for o, n in sorted(outs.items())
        if n
    ]
    out = "<h2>Ingest</h2>" + _table(["task", "outcome", "count"], rows)
    p50 = metrics.latency_quantile(f["latency"], 0.5)
    p95 = metrics.latency_quantile(f["latency"], 0.95)
    if p50 is not None:
        out += f"<p>C-STORE to searchable: median &le; {p50:g} s, 95th percentile &le; {p95:g} s.</p>"
    return out


def _index(f: dict[str, Any]) -> str:
    rows = [
        [e(m["serves"]), e(m["version"]), m["nbits"], e(m["state"]), "yes" if m["active"] else ""]
        + [m["image"], m["series"], m["study"]]
        for m in f["models"]
    ]
    head = ["route (what it serves)", "model version", "bits", "state", "answers"]
    head += ["image codes", "series codes", "study codes"]
    out = "<h2>Index</h2>" + _table(head, rows)
    waiting = f.get("no_model") or {}
    if waiting:
        per = ", ".join(f"{e(mod)} {n}" for mod, n in sorted(waiting.items()))
        out += (
            "<p>Stored without a model (no route takes them; register one with"
            f" <code>drh-pacs register</code>): {per}.</p>"
        )
    by_modality = f.get("by_modality") or {}
    if by_modality:
        rows = [[e(mod), *(c[o] for o in MODALITY_OUTCOMES)] for mod, c in sorted(by_modality.items())]
        head = ["modality", *(o.replace("-", " ") for o in MODALITY_OUTCOMES)]
        out += "<h3>By modality</h3>" + _table(head, rows)
    job = f["reindex"]
    if job:
        out += (
            f"<p>{'Re-sort into' if job.get('mode') == 'resort' else 'Re-index to'}"
            f" <code>{e(job.get('version', ''))}</code>: {e(job.get('state', ''))},"
            f" {job['done']} / {job['total']} instances, {job['failed']} failed.</p>"
        )
    return out


def _failures(f: dict[str, Any]) -> str:
    fl = f["failures"]
    out = (
        f"<h2>Failures</h2><p>{fl['count']} failed, {fl['ignored']} non-image objects ignored,"
        f" {fl.get('refused', 0)} refused at reception (the sender must send them again once fixed)."
    )
    if fl["count"]:
        out += " <button onclick=\"retry('all')\">retry all</button>"
    out += "</p>"
    if not fl["recent"]:
        return out
    rows = [
        [
            f"<code>{e(x['sop_uid'])}</code>",
            e(x["reason"]),
            e(x["kind"]),
            e(x["state"]),
            x["count"],
            _when(x["first_seen"]),
            _when(x["last_seen"]),
            # a UID is digits and dots; anything else never reaches a script
            f"<button onclick=\"retry('{x['sop_uid']}')\">retry</button>" if is_uid(x["sop_uid"]) else "",
        ]
        for x in fl["recent"]
    ]
    headers = ["SOP Instance UID", "reason", "kind", "state", "count", "first seen", "last seen", ""]
    out += _table(headers, rows)
    refused = [
        [f"<code>{e(x['sop_uid'])}</code>", e(x["reason"]), e(x["status"]), e(x["source_ae"]), x["count"],
         _when(x["last_seen"])]
        for x in fl.get("recent_refused", [])
    ]  # fmt: skip
    if refused:
        out += "<h3>Refused at reception</h3>"
        out += _table(["SOP Instance UID", "reason", "status", "sender", "count", "last seen"], refused)
    return out


SECTIONS = (_queues, _workers, _dicom, _ingest, _index, _failures)


def render_html(f: dict[str, Any]) -> str:
    """The whole page; with Redis down, only what is known: that it is down, and why."""
    if not f["redis_ok"]:
        body = f"<p class='bad'>{e(f.get('error', 'Redis unavailable'))}</p>" + _dicom(f)
    else:
        body = "".join(section(f) for section in SECTIONS)
    return _PAGE.format(when=_when(f["time"]), ns=e(f["namespace"]), body=body)
