"""Benchmark harness for the Session Gateway (`python -m bench`, `make bench`).

Measures, side by side in one run and against one fast backend: the backend directly,
nginx, the case study's naive Redis-per-request proxy, and the gateway with sessions off
and on; then the case study's own table (legacy shop on PostgreSQL vs the shop behind the
gateway), the session store alone, Redis memory per session and the 6,000 writes/s test.
"""
