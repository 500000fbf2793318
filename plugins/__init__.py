"""The built-in plugins, one module each. ``BUILTIN`` is their registry: a name in
``plugins:`` → the module holding one Plugin subclass (or ``module:Class``). The core
reads it (gateway/chain.py) and names no plugin itself."""

BUILTIN = {
    "cart": "plugins.cart",
    "viewed_items": "plugins.viewed_items",
    "page_cache": "plugins.page_cache",
    "rate_limit": "plugins.rate_limit",
    "legacy_sessions": "plugins.legacy_sessions",
}
