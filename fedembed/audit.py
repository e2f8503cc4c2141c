"""An organisation's audit trail: a copy of every byte it sends to the coordinator.

:class:`AuditMod` is a Flower client mod. Wrapped around the ClientApp, it writes the
serialized objects of every reply (exactly what Flower ships, array chunks included) to
``<directory>/<n>-<message type>.bin`` and a readable index ``<n>-<message type>.json``
(record names, array names, dtypes and shapes). An organisation's reviewer can check
that nothing but row ids, row deltas, weights and metrics ever left; the privacy tests
read the same files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedembed.store import atomic_write

log = logging.getLogger(__name__)


class AuditMod:
    """Flower client mod recording every outgoing reply.

    Parameters
    ----------
    directory : str or Path
        Where the audit files go (created if missing).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = str(directory)

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        try:
            self._record(reply)
        except Exception as exc:  # auditing must not break training, but must be loud
            log.error("audit: could not record a reply: %s", exc)
        return reply

    def _record(self, reply: Message) -> None:
        d = Path(self.directory)
        d.mkdir(parents=True, exist_ok=True)
        n = len(list(d.glob("*.bin")))
        stem = f"{n:05d}-{os.getpid()}-{reply.metadata.message_type}"
        if reply.has_error():
            atomic_write(d / f"{stem}.json", json.dumps({"error": reply.error.reason}).encode())
            return
        objects = get_all_nested_objects(reply.content)
        atomic_write(d / f"{stem}.bin", b"".join(o.deflate() for o in objects.values()))
        index: dict = {"org": reply.content["sig"].get("name") if "sig" in reply.content else None}  # who signed
        for name, rec in reply.content.items():
            if isinstance(rec, ArrayRecord):
                index[name] = {k: {"dtype": a.dtype, "shape": list(a.shape)} for k, a in rec.items()}
            else:
                index[name] = sorted(rec.keys())
        atomic_write(d / f"{stem}.json", json.dumps(index, indent=1).encode())
