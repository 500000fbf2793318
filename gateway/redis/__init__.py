"""The Redis layer: connections (client.py), key names (keys.py), scripts (scripts.py),
the near-cache's tracking link (tracking.py), batched session reads (batching.py) and
the embedded server (embedded.py)."""

from .client import (
    RedisClient,
    RedisLayer,
    close_client,
    make_client,
    open_redis,
    start_embedded,
)
from .keys import Keys, public_id
from .scripts import BoundScript, Script

__all__ = [
    "BoundScript",
    "Keys",
    "RedisClient",
    "RedisLayer",
    "Script",
    "close_client",
    "make_client",
    "open_redis",
    "public_id",
    "start_embedded",
]
