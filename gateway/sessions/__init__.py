"""Sessions: the model (model.py), reads and writes (store.py), the per-user index
(users.py), the near-cache (nearcache.py), write-behind activity (activity.py), the layer
that wires them (layer.py), and the services the proxy and the admin API use: the
resolver (resolver.py) and the actions (actions.py)."""

from .model import RESERVED_FIELDS, Session, apply_activity, new_token, public_id, ts, valid_token

__all__ = [
    "RESERVED_FIELDS",
    "Session",
    "apply_activity",
    "new_token",
    "public_id",
    "ts",
    "valid_token",
]
