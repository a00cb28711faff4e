"""The Celery application of drh-pacs and its tasks: decode, hash, pool studies, write to Redis."""
