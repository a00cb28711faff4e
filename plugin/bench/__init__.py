"""``drh-pacs bench ...``: benchmarks as commands (fixed seeds, warm-up, repetitions, a reference
measured in the same run). Off the runtime path: no module of the running service imports this."""
