"""Cache keys: the short hash that names a cached file after what it was made from."""

from __future__ import annotations

import hashlib
import json


def json_key(content) -> str:
    """12 hex digits of the SHA-1 of ``content`` (JSON-serialisable) written as JSON with sorted keys: equal
    contents give one key whatever the order of their dicts, and any changed value gives another."""
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
