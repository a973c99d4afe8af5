"""The stages, one module a stage (evaluation: a small package): the plain function that does the work,
callable without a server, and beside it the thin Prefect task that adds caching, retries, logging and
artifacts."""
