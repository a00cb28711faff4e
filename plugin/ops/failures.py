"""``drh-pacs failures [list | refused | retry UID | retry --all]``: what could not be indexed, and trying it again.

The ledger itself is :mod:`plugin.store.ledger`; a retry re-queues through :mod:`workers.client`.
``refused`` lists the C-STOREs the SCP refused (malformed data: nothing was kept, so only the
sender can send them again, once fixed), with the reason each sender was told.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import redis

from plugin.ops.maintenance import connect_app
from workers.client import EnqueueError, retry_all_failed, retry_failed, store_for


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drh-pacs failures", description="list or retry failed instances")
    sub = parser.add_subparsers(dest="cmd")
    ls = sub.add_parser("list", help="recent failures, newest first")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rf = sub.add_parser("refused", help="C-STOREs refused at reception, newest first, with the reason")
    rf.add_argument("--limit", type=int, default=50)
    rf.add_argument("--json", action="store_true", help="machine-readable output")
    rt = sub.add_parser("retry", help="re-queue failed instances")
    rt.add_argument("uid", nargs="?", help="SOPInstanceUID to retry")
    rt.add_argument("--all", action="store_true", help="retry every failed instance")
    args = parser.parse_args(argv)
    app = connect_app("failures")
    if app is None:
        return 2
    ledger = store_for(app).ledger
    try:
        if args.cmd in (None, "list"):
            entries = ledger.list(getattr(args, "limit", 50))
            if getattr(args, "json", False):
                print(json.dumps(entries, indent=2))
                return 0
            print(
                f"{ledger.count()} failed instance(s), {ledger.ignored_count()} ignored non-image object(s),"
                f" {ledger.refused_count()} refused at reception (`drh-pacs failures refused`)"
            )
            for e in entries:
                print(
                    f"{e['sop_uid']}  {e['state']:<8} {e['kind']:<9} x{e['count']:<3} "
                    f"first {_fmt_time(e['first_seen'])}  last {_fmt_time(e['last_seen'])}\n    {e['reason']}"
                )
            return 0
        if args.cmd == "refused":
            refused = ledger.refused(args.limit)
            if args.json:
                print(json.dumps(refused, indent=2))
                return 0
            print(f"{ledger.refused_count()} instance(s) refused at reception; the sender must send them again")
            for e in refused:
                print(
                    f"{e['sop_uid']}  status {e['status']}  from {e['source_ae'] or '?'}  x{e['count']:<3}"
                    f" last {_fmt_time(e['last_seen'])}  study {e['study_uid'] or '?'}\n    {e['reason']}"
                )
            return 0
        if args.all:
            print(f"re-queued {retry_all_failed(app)} instance(s)")
            return 0
        if not args.uid:
            parser.error("retry needs a SOPInstanceUID or --all")
        if not retry_failed(app, args.uid):
            refused = ledger.refused_among([args.uid])
            if refused:
                print(
                    f"drh-pacs failures: {args.uid} was refused at reception (nothing was kept):"
                    " send it again from its PACS once fixed",
                    file=sys.stderr,
                )
                return 1
            print(f"drh-pacs failures: {args.uid} is not in the failure ledger", file=sys.stderr)
            return 1
        print(f"re-queued {args.uid}")
        return 0
    except (redis.exceptions.RedisError, EnqueueError) as exc:
        print(f"drh-pacs failures: Redis or broker unavailable: {exc}", file=sys.stderr)
        return 1
