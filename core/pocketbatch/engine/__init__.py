"""How calls run: rate limits (limits.py), retries (retry.py), the worker pool (concurrent.py), events.

`concurrent.call(provider, request)` is the single way a request reaches a provider on the concurrent
path; `concurrent.run_all` runs many through a bounded worker pool.
"""
