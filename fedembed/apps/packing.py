"""A message's records packed into few Flower objects at the transport boundary, and unpacked strictly.

Flower ships a message as a tree of objects (the message, its ``RecordDict``, every record,
every array, every 5 MiB chunk of an array), each pulled or pushed in an HTTP request of
its own: a deployed training reply was 16 requests each way through the coordinator's gate,
and every request costs milliseconds of CPU in three or four Python processes. A deployed
ServerApp therefore packs what it sends (:class:`fedembed.apps.server.GridTransport`), and
an organisation packs its reply the same way when the message came packed
(:mod:`fedembed.deploy.handoff`, :class:`PackingMod` in the per-message ClientApp):

- the records of one message that are its own (its config, metrics, signature, its
  update...) become one record ``fedembed.packed``: a ``ConfigRecord`` holding their
  serialized form when it is small (at most :data:`SMALL_BYTES`), else an
  ``ArrayRecord`` holding it as one ``uint8`` array, which Flower chunks like any array
  (large vectors never travel as bytes in a config record);
- an ``ArrayRecord`` the ServerApp sends to several organisations at once (the sync of
  the rows they share) is packed on its own, under its own name, the same way: the same
  bytes for every organisation, so Flower still pushes it once.

A message or reply is then 3 objects (the message, its ``RecordDict``, one record) when
it is small, 5 with its arrays as an array (a training reply was 16, a training message
10). The serialized form is Flower's own ``RecordDict`` protobuf
(:func:`flwr.common.serde.recorddict_to_proto`): every value keeps its exact type, so
unpacking gives back the records exactly as they were signed (packing happens after the
organisation signs, unpacking before the coordinator verifies or reads anything).
Nothing is pickled. :func:`unpack` refuses anything but this layout, saying what was wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedembed.errors import FedembedError

log = logging.getLogger(__name__)

PACKED = "fedembed.packed"
"""Name of the record holding a message's own records, packed."""

RECORDS = "records"
"""The key, in the packed record, of the serialized records."""

RECORD = "fedembed.record"
"""The key, in an ``ArrayRecord`` packed on its own, of its serialized form."""

STYPE = "fedembed.recorddict"
"""``stype`` of an array holding serialized records."""

SMALL_BYTES = 64 << 10
"""Packed records up to this size travel as bytes in a ``ConfigRecord`` (one Flower object); larger
ones as a ``uint8`` array in an ``ArrayRecord`` (three objects or more: the record, the array, its chunks)."""


class PackingError(FedembedError, ValueError):
    """A packed message is not laid out as :func:`pack` lays it out (what was wrong is in the text)."""


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` is a packed message (it holds :data:`PACKED`)."""
    return PACKED in content


def _serialize(records: Mapping[str, Any]) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(RecordDict(dict(records))).SerializeToString(deterministic=True)


def _blob(data: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)


def _packed(data: bytes, key: str) -> ConfigRecord | ArrayRecord:
    """Serialized records as one record: bytes in a config record when small, else a byte array."""
    return ConfigRecord({key: data}) if len(data) <= SMALL_BYTES else ArrayRecord({key: _blob(data)})


def pack_shared(record: ArrayRecord) -> ConfigRecord | ArrayRecord:
    """``record`` packed on its own: the same bytes wherever it is sent (so Flower pushes it once)."""
    return _packed(_serialize({RECORD: record}), RECORD)


def pack(content: RecordDict, shared: Mapping[str, ConfigRecord | ArrayRecord] | None = None) -> RecordDict:
    """``content`` packed into :data:`PACKED` (its own records) and the records in ``shared``, each packed on its own.

    Parameters
    ----------
    content : RecordDict
        The message's content (already signed, for a reply).
    shared : mapping of str to ArrayRecord, optional
        Records of ``content`` to pack on their own, by name, already packed with
        :func:`pack_shared` (the caller packs a record sent to several nodes once).

    Raises
    ------
    PackingError
        ``content`` already holds a record named :data:`PACKED`.
    """
    if PACKED in content:
        raise PackingError(f"the content already holds a record named {PACKED!r}")
    shared = dict(shared or {})
    out: dict[str, Any] = dict(shared)
    out[PACKED] = _packed(_serialize({name: rec for name, rec in content.items() if name not in shared}), RECORDS)
    return RecordDict(out)


def _records(data: object, what: str) -> dict[str, Any]:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

    if not isinstance(data, bytes):
        raise PackingError(f"{what} holds a {type(data).__name__}, not bytes")
    try:
        return dict(recorddict_from_proto(ProtoRecordDict.FromString(data)).items())
    except Exception as exc:  # noqa: BLE001 - any malformed protobuf or record is refused with its reason
        raise PackingError(f"{what} cannot be read: {type(exc).__name__}: {exc}") from exc


def _packed_bytes(record: object, key: str, what: str) -> bytes:
    """The serialized records a packed record holds (bytes in a small config record, or a byte array)."""
    if isinstance(record, ConfigRecord):
        if list(record.keys()) != [key]:
            raise PackingError(f"{what} holds {sorted(record.keys())}, expected only {key!r}")
        data = record[key]
        if not isinstance(data, bytes):
            raise PackingError(f"{what} holds a {type(data).__name__}, not bytes")
        if len(data) > SMALL_BYTES:
            raise PackingError(f"{what} holds {len(data)} bytes in a config record (at most {SMALL_BYTES}: "
                               "larger ones travel as an array)")
        return data
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [key]:
        raise PackingError(f"{what} is not a packed record holding only {key!r}")
    arr = record[key]
    if arr.stype != STYPE or arr.dtype != "uint8" or list(arr.shape) != [len(arr.data)]:
        raise PackingError(f"{what} is not a {STYPE} byte array (stype {arr.stype!r}, dtype {arr.dtype!r}, "
                           f"shape {list(arr.shape)}, {len(arr.data)} bytes)")
    return bytes(arr.data)


def unpack(content: RecordDict) -> RecordDict:
    """The records :func:`pack` packed into ``content``; ``content`` itself if it is not packed.

    Raises
    ------
    PackingError
        ``content`` is packed but not as :func:`pack` packs: a record that is neither
        :data:`PACKED` nor a record packed on its own, bytes that are not serialized
        records, a large packed record as config bytes, a packed record inside the packed
        records, or one name twice.
    """
    if not is_packed(content):
        return content
    records: dict[str, Any] = {}
    for name, rec in content.items():
        if name == PACKED:
            for inner, r in _records(_packed_bytes(rec, RECORDS, f"record {PACKED!r}"), f"record {PACKED!r}").items():
                if inner == PACKED or inner in records:
                    raise PackingError(f"record {inner!r} appears twice in the packed message")
                records[inner] = r
        else:
            inner = _records(_packed_bytes(rec, RECORD, f"record {name!r}"), f"record {name!r}")
            if list(inner) != [RECORD] or not isinstance(inner[RECORD], ArrayRecord):
                raise PackingError(f"record {name!r} does not hold one packed array record")
            if name in records:
                raise PackingError(f"record {name!r} appears twice in the packed message")
            records[name] = inner[RECORD]
    return RecordDict(records)


def shared_records(contents: Mapping[int, RecordDict]) -> dict[int, dict[str, ConfigRecord | ArrayRecord]]:
    """Per node, the array records it shares with another node (the same object, under the same name), packed once each.

    The coordinator builds a record several organisations receive once (e.g. the rows of
    a table version they all hold); packed on its own, it stays one object for Flower.
    """
    seen: dict[tuple[str, int], list[int]] = {}
    for node, content in contents.items():
        for name, rec in content.items():
            if isinstance(rec, ArrayRecord):
                seen.setdefault((name, id(rec)), []).append(node)
    out: dict[int, dict[str, ConfigRecord | ArrayRecord]] = {node: {} for node in contents}
    for (name, _), nodes in seen.items():
        if len(nodes) > 1:
            packed = pack_shared(contents[nodes[0]][name])
            for node in nodes:
                out[node][name] = packed
    return out


class PackingMod:
    """Flower mod: unpack a packed message before the ClientApp sees it, pack its reply the same way.

    Outermost of the ClientApp's mods, so that the others (and the handlers) see the
    records as the coordinator built them, and the reply is packed after it was signed.
    A message that is not packed passes through, and so does its reply.
    """

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        """Unpack, handle, pack."""
        if msg.has_error() or not is_packed(msg.content):
            return call_next(msg, context)
        msg.content = unpack(msg.content)  # a PackingError becomes Flower's error reply, naming it
        reply = call_next(msg, context)
        if not reply.has_error():
            reply.content = pack(reply.content)
        return reply
