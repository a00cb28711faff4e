"""What IT staff run and read: the status figures (terminal, page, Prometheus), failures and retries,
re-indexing, model versions, deletion and compaction, and the Orthanc backfill."""
