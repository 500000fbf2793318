"""The parts of the ``legacy_sessions`` plugin (plugins/legacy_sessions.py), one concept
each: its options, the legacy database, the rollout buckets, the once-per-session reads,
the rollback write-behind and the migration counters."""
