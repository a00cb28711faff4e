"""The HTTP API (Starlette): similar search for web viewers and scripts, and the routes IT staff use
(health, readiness, metrics, status page, retries, spooled files for remote workers)."""
