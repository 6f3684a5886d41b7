"""What the sweep service needs of Ray beyond its public API (Ray >= 2.40, < 3).

* A put into a :class:`ray.util.queue.Queue` that does not wait: ``Queue.put_nowait`` blocks
  the caller until the queue actor answers, so a training task would stall on every flush of
  its curve points; the queue's actor handle (``Queue.actor``, undocumented) gives the
  object reference instead (:func:`put_nowait_async`).
* The name of the logger of Ray's token-authentication notice, a module under ``ray._private``
  (:data:`TOKEN_NOTICE_LOGGER`), to keep that notice out of quiet output.
"""

from __future__ import annotations

from typing import Any

#: The logger of Ray's "token authentication is enabled" notice (a warning on every ``ray.init``).
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def put_nowait_async(queue: Any, item: Any) -> Any:
    """Put ``item`` into the :class:`ray.util.queue.Queue` ``queue`` without waiting: the
    object reference of the put (``ray.get`` it to wait; raises ``ray.util.queue.Full`` there)."""
    return queue.actor.put_nowait.remote(item)


__all__ = ["TOKEN_NOTICE_LOGGER", "put_nowait_async"]
