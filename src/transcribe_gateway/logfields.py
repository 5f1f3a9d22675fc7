"""A logger with fixed fields (a session's id, a provider's name) on every line."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class Fields(logging.LoggerAdapter[logging.Logger]):
    """Adds its fixed fields to each call's own ``extra``.  The standard adapter
    replaces a call's ``extra`` with its own (``merge_extra`` came in Python
    3.13), which dropped every per-call field: a session's key, a reason."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs
