"""The ``drh-pacs`` command.

Each sub-command lives in the module that owns its concern and exposes ``main(argv) -> int``; this
file only dispatches, importing the module lazily so that ``drh-pacs status`` does not pay for
importing torch.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module" or "module:function", one-line help); the function defaults to ``main``. Nested
# commands ("bench index") are written with a space.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("plugin.serve", "run the whole service: Redis (embedded if none), worker, DICOM SCP, HTTP API"),
    "worker": ("workers.app", "run a Celery worker against the configured Redis"),
    "status": ("plugin.ops.status", "print queue depths, workers, index sizes and recent failures"),
    "train": ("hashing.train", "train a DRH or DMIH model on a data directory"),
    "evaluate": ("hashing.evaluate", "score models and baselines: mAP, precision@k, PR curve"),
    "reindex": ("plugin.ops.reindex", "re-index a route's images with a new model version in the background"),
    "register": ("plugin.ops.reindex:register_main", "serve a checkpoint for a route (e.g. MG + BREAST) and index it"),
    "reroute": ("plugin.ops.reroute", "move stored images to the route that takes them now (after an upgrade)"),
    "failures": ("plugin.ops.failures", "list or retry instances that failed permanently"),
    "delete-study": ("plugin.ops.maintenance:delete_study_main", "remove studies everywhere (misfiled, retracted)"),
    "repool": ("plugin.ops.maintenance:repool_main", "pool every study again (series codes for older studies)"),
    "compact": ("plugin.ops.maintenance:compact_main", "reclaim the slots of deleted codes (replicas reload)"),
    "models": ("plugin.ops.maintenance:models_main", "list the model versions in Redis, or drop one no longer active"),
    "backfill orthanc": ("plugin.ops.orthanc", "index an existing Orthanc archive (resumable)"),
    "users": ("plugin.http.auth", "add, remove or list the people who may log in to the similar-cases page"),
    "bench index": ("plugin.bench.index", "Hamming search latency at 1M/10M codes against FAISS"),
    "bench model": ("plugin.bench.model", "model throughput: images/s by device and batch size"),
    "bench ingest": ("plugin.bench.ingest", "C-STORE throughput against DCMTK storescp"),
    "bench query": ("plugin.bench.query", "C-FIND similar latency from a DICOM client"),
    "decode-check": ("hashing.decode_check", "decode every DICOM file under a folder, or say why not"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: drh-pacs <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Settings come from DRH_* environment variables and the DRH_CONFIG file (see README)."]
    return "\n".join(lines)


def _group_usage(group: str) -> str:
    """The sub-commands of a two-word command group (``bench``, ``backfill``)."""
    members = {n: h for n, (_, h) in COMMANDS.items() if n.startswith(group + " ")}
    width = max(len(n) for n in members)
    lines = [f"usage: drh-pacs {group} <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, help_ in members.items()]
    lines += ["", f"`drh-pacs {group} <command> --help` describes the options of each."]
    return "\n".join(lines)


def _is_group(name: str) -> bool:
    return any(n.startswith(name + " ") for n in COMMANDS)


HELP_FLAGS = {"-h", "--help", "help"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(_usage())
        return 0
    name = argv[0]
    rest = argv[1:]
    if name not in COMMANDS and rest and f"{name} {rest[0]}" in COMMANDS:
        name, rest = f"{name} {rest[0]}", rest[1:]
    elif name not in COMMANDS and _is_group(name):
        # `drh-pacs bench --help` lists the benchmarks; a missing or unknown one says which exist
        if rest and rest[0] in HELP_FLAGS:
            print(_group_usage(name))
            return 0
        what = f"unknown command {' '.join(argv[:2])!r}" if rest else f"{name!r} needs a command"
        print(f"drh-pacs: {what}\n\n{_group_usage(name)}", file=sys.stderr)
        return 2
    if name not in COMMANDS:
        print(f"drh-pacs: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
