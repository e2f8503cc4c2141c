"""What travels: row syncs and row-sparse updates as Flower records, and their byte sizes.

Arrays ride in an ``ArrayRecord`` (Flower chunks them into 5 MiB pieces), one entry per
``<table>.<field>``. Row ids travel as int32 when the table has fewer than 2^31 rows.
Decoding never trusts the sender: any fault raises :class:`fedembed.sparse.UpdateError`
with a message saying what was wrong.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedembed.sparse import WIRE_DTYPES, RowUpdate, TableUpdate, UpdateError, validate_update
from fedembed.tables import RowRequest, RowSync

log = logging.getLogger(__name__)


def _ids_dtype(rows: int) -> type:
    return np.int32 if rows < 2**31 else np.int64


def record_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content as Flower ships it (every object, deflated).

    Identical array chunks are shipped once, as Flower does; this is the payload without
    the gRPC/HTTP framing.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def _canonical(value: object) -> bytes:
    """Type-tagged bytes of one config/metric value (bool before int: True is an int in Python)."""
    if isinstance(value, bool):
        return b"b1" if value else b"b0"
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, float):
        return b"f" + (value.hex() if math.isfinite(value) else repr(value)).encode()
    if isinstance(value, str):
        return b"s" + value.encode()
    if isinstance(value, bytes | bytearray):
        return b"y" + bytes(value)
    if isinstance(value, list):
        return b"l" + b"".join(len(c).to_bytes(8, "big") + c for c in map(_canonical, value))
    raise UpdateError(f"unsupported record value of type {type(value).__name__}")


def content_digest(content: RecordDict, skip: Iterable[str] = ()) -> bytes:
    """SHA-256 over everything in a message's content, in a canonical order.

    Every record (name, kind), every entry (key, value; arrays by dtype, shape,
    serialization type and bytes) is length-prefixed, so two different contents never
    share a digest. Used to sign replies (:mod:`fedembed.identity`); records in ``skip``
    (the signature itself) are left out.

    Raises
    ------
    UpdateError
        If a record holds something that is not a plain config, metric or array value.
    """
    h = hashlib.sha256()
    skip = set(skip)

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)

    for name in sorted(content.keys()):
        if name in skip:
            continue
        rec = content[name]
        put(name.encode())
        put(type(rec).__name__.encode())
        for key in sorted(rec.keys()):
            put(key.encode())
            value = rec[key]
            if isinstance(rec, ArrayRecord):
                put(f"{value.dtype}|{tuple(value.shape)}|{value.stype}".encode())
                put(hashlib.sha256(value.data).digest())
            else:
                put(_canonical(value))
    return h.digest()


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` holding numpy arrays by name."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def decode_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Numpy arrays of an ``ArrayRecord``; raises :class:`UpdateError` when one cannot be read."""
    out = {}
    for key, arr in record.items():
        try:
            out[key] = arr.numpy()
        except Exception as exc:  # malformed bytes, wrong stype, pickles...
            raise UpdateError(f"array {key!r} cannot be decoded: {exc}") from exc
    return out


def encode_sync(sync: Mapping[str, RowSync], shapes: Mapping[str, tuple[int, int]]) -> ArrayRecord:
    """Rows to overwrite, per table: ``<t>.ids``, ``<t>.rows`` (float32, exact) and ``<t>.stamps`` (int32).

    The stamps (the round that last changed each row) cost 4 bytes a row; they let the
    organisation hold the stamp of every row it keeps and refuse a sync that rolls one back.
    """
    arrays: dict[str, np.ndarray] = {}
    for name, rs in sync.items():
        arrays[f"{name}.ids"] = rs.ids.astype(_ids_dtype(shapes[name][0]))
        arrays[f"{name}.rows"] = rs.values.astype(np.float32)
        if rs.stamps is not None:
            arrays[f"{name}.stamps"] = rs.stamps.astype(np.int32)
    return encode_arrays(arrays)


def array_view(arr: Array) -> np.ndarray:
    """A read-only numpy view of an ``Array``'s bytes, without the copy ``Array.numpy()`` makes.

    For large vectors the coordinator folds into a sum: the message's bytes are the only
    copy. Only plain numeric dtypes are accepted (never objects or pickles).

    Raises
    ------
    UpdateError
        If the array is not a well-formed, plain numeric ``.npy`` payload.
    """
    if arr.stype != "numpy.ndarray":
        raise UpdateError(f"array of serialization type {arr.stype!r}, expected numpy.ndarray")
    data = arr.data
    try:
        fp = io.BytesIO(data)
        version = np.lib.format.read_magic(fp)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fp)
        if fortran or dtype.hasobject or dtype.kind not in "uif":
            raise ValueError(f"unsupported array layout or dtype {dtype}")
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(data, dtype=dtype, count=count, offset=fp.tell()).reshape(shape)
    except (ValueError, TypeError, OSError) as exc:
        raise UpdateError(f"array cannot be read: {exc}") from exc


def decode_sync(record: ArrayRecord, shapes: Mapping[str, tuple[int, int]]) -> dict[str, RowSync]:
    """Inverse of :func:`encode_sync`, checked against the local table shapes (never trusting the sender).

    Parameters
    ----------
    record : ArrayRecord
        The ``sync`` record of a coordinator's message.
    shapes : Mapping[str, tuple[int, int]]
        ``(rows, dim)`` of every table this organisation holds.

    Returns
    -------
    dict[str, RowSync]
        Per table named in the sync: sorted row ids, their float32 values and stamps.

    Raises
    ------
    UpdateError
        Says what is wrong: ids that are not a 1-d integer array with their rows, a shape
        that does not fit the table, ids out of range, unsorted or duplicated, row values
        that are not plain numbers or are not finite (NaN or inf, also once cast to
        float32), stamps that do not match the ids. Raised before anything is applied.
    """
    arrays = decode_arrays(record)
    out = {}
    for name, (rows, dim) in shapes.items():
        if f"{name}.ids" not in arrays:
            continue
        raw = arrays[f"{name}.ids"]
        if raw.ndim != 1 or raw.dtype.kind not in "iu" or f"{name}.rows" not in arrays:
            raise UpdateError(f"sync of table {name!r}: ids must be a 1-d integer array with its rows")
        ids = raw.astype(np.int64)
        vals = arrays[f"{name}.rows"]
        if vals.shape != (ids.shape[0], dim) or (ids.size and (ids.min() < 0 or ids.max() >= rows)):
            raise UpdateError(f"sync of table {name!r} does not fit its shape ({rows}, {dim})")
        if ids.size > 1 and not np.all(np.diff(ids) > 0):
            raise UpdateError(f"sync of table {name!r}: row ids are not sorted and unique")
        if vals.dtype.kind not in "fiu":
            raise UpdateError(f"sync of table {name!r}: row values of dtype {vals.dtype} (plain numbers only)")
        with np.errstate(over="ignore"):  # a float64 beyond float32's range turns inf here, and is refused below
            vals = vals.astype(np.float32)
        finite = np.isfinite(vals).all(axis=1)
        if not finite.all():  # NaN/inf would be cached and poison every head fitted on them
            raise UpdateError(f"sync of table {name!r}: {int((~finite).sum())} rows hold non-finite values "
                              f"(NaN or inf), e.g. rows {ids[~finite][:5].tolist()}")
        stamps = arrays.get(f"{name}.stamps")
        if stamps is not None:
            if stamps.shape != ids.shape or stamps.dtype.kind not in "iu":
                raise UpdateError(f"sync of table {name!r}: stamps do not match its ids")
            stamps = stamps.astype(np.int64)
        out[name] = RowSync(ids, vals, stamps)
    return out


MAX_REQUEST_SHARE = 1.0
"""A working-set request may name at most this share of a table's rows (all of them: no more exists)."""


def encode_request(request: Mapping[str, RowRequest], shapes: Mapping[str, tuple[int, int]]) -> ArrayRecord:
    """An organisation's working-set request on the wire: ``<t>.ids`` and ``<t>.new`` per table (int32)."""
    arrays: dict[str, np.ndarray] = {}
    for name, req in request.items():
        dtype = _ids_dtype(shapes[name][0])
        arrays[f"{name}.ids"] = np.asarray(req.ids).astype(dtype)
        arrays[f"{name}.new"] = np.asarray(req.new).astype(dtype)
    return encode_arrays(arrays)


def decode_request(record: ArrayRecord, shapes: Mapping[str, tuple[int, int]]) -> dict[str, RowRequest]:
    """Decode and validate an organisation's working-set request (never trusting the sender).

    Every shared table must be named; per table ``ids`` must be a 1-d integer array of
    sorted, unique row ids in range, at most :data:`MAX_REQUEST_SHARE` of the table's rows,
    and ``new`` a sorted, unique subset of them.

    Raises
    ------
    UpdateError
        Says what is wrong (unknown or missing table, unreadable array, out of range,
        unsorted or duplicated ids, too many rows, ``new`` outside ``ids``).
    """
    arrays = decode_arrays(record)
    expected = {f"{n}.{f}" for n in shapes for f in ("ids", "new")}
    unknown = sorted(set(arrays) - expected)
    if unknown:
        raise UpdateError(f"working-set request: unexpected arrays {[_short(k) for k in unknown[:5]]}")
    missing = sorted(expected - set(arrays))
    if missing:
        raise UpdateError(f"working-set request lacks {missing[:5]} (it names every shared table)")
    out: dict[str, RowRequest] = {}
    for name, (rows, _dim) in shapes.items():
        parts = []
        for fld in ("ids", "new"):
            a = arrays[f"{name}.{fld}"]
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise UpdateError(f"working-set request of table {name!r}: {fld} must be a 1-d integer array")
            parts.append(a.astype(np.int64))
        ids, new = parts
        if ids.size > MAX_REQUEST_SHARE * rows:
            raise UpdateError(f"working-set request of table {name!r} names {ids.size} rows; the table has {rows}")
        for fld, a in (("ids", ids), ("new", new)):
            if a.size and (a[0] < 0 or a[-1] >= rows or a.min() < 0 or a.max() >= rows):
                raise UpdateError(f"working-set request of table {name!r}: {fld} out of range [0, {rows})")
            if a.size > 1 and not np.all(np.diff(a) > 0):
                raise UpdateError(f"working-set request of table {name!r}: {fld} not sorted and unique")
        if new.size and not np.isin(new, ids, assume_unique=True).all():
            raise UpdateError(f"working-set request of table {name!r}: new rows outside its ids")
        out[name] = RowRequest(ids, new)
    return out


def encode_request_digest(digest: bytes) -> ArrayRecord:
    """A request unchanged from the one the coordinator holds, by its SHA-256 alone (``digest``, 32 bytes)."""
    return encode_arrays({"digest": np.frombuffer(digest, dtype=np.uint8)})


def decode_request_digest(record: ArrayRecord) -> bytes | None:
    """The digest of a by-digest request, or None when ``record`` is a full request.

    Raises
    ------
    UpdateError
        A ``digest`` entry that is not 32 bytes, or one next to other entries.
    """
    if "digest" not in record.keys():
        return None
    arrays = decode_arrays(record)
    d = arrays["digest"]
    if set(arrays) != {"digest"} or d.dtype != np.uint8 or d.shape != (32,):
        raise UpdateError("working-set request by digest: one uint8 array of 32 bytes, nothing else")
    return d.tobytes()


def _short(text: str, limit: int = 60) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))[:limit]


def encode_update(update: RowUpdate, shapes: Mapping[str, tuple[int, int]], dtype: str = "float16") -> ArrayRecord:
    """A row-sparse update on the wire: ``<t>.ids``, ``<t>.delta`` (``dtype``), ``<t>.weight``.

    Parameters
    ----------
    update : RowUpdate
        The update.
    shapes : Mapping[str, tuple[int, int]]
        Table shapes (pick the id dtype).
    dtype : str
        ``float16`` (default) or ``float32`` for the deltas.
    """
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    arrays: dict[str, np.ndarray] = {}
    for name, tu in update.items():
        arrays[f"{name}.ids"] = tu.ids.astype(_ids_dtype(shapes[name][0]))
        delta = tu.delta
        if dtype == "float16":
            # Deltas are small; clip into float16's range so none turns into inf on the way.
            delta = np.clip(delta, -65000.0, 65000.0)
        arrays[f"{name}.delta"] = delta.astype(WIRE_DTYPES[dtype])
        arrays[f"{name}.weight"] = tu.weight.astype(np.float32)
    return encode_arrays(arrays)


def decode_update(
    record: ArrayRecord, shapes: Mapping[str, tuple[int, int]], max_weight: float | None = None
) -> RowUpdate:
    """Decode and validate an organisation's update.

    Raises
    ------
    UpdateError
        Unreadable arrays, unknown or incomplete tables, wrong shapes or dtypes, ids out
        of range, duplicate ids, NaN/inf, weights out of range.
    """
    arrays = decode_arrays(record)
    tables: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        name, dot, fld = key.rpartition(".")
        if not dot or fld not in ("ids", "delta", "weight"):
            raise UpdateError(f"unexpected array {key!r} in update")
        tables.setdefault(name, {})[fld] = arr
    update: RowUpdate = {}
    for name, parts in tables.items():
        missing = {"ids", "delta", "weight"} - set(parts)
        if missing:
            raise UpdateError(f"table {name!r}: update lacks {sorted(missing)}")
        if parts["delta"].dtype not in (np.float16, np.float32):
            raise UpdateError(f"table {name!r}: delta dtype {parts['delta'].dtype} is not float16/float32")
        update[name] = TableUpdate(parts["ids"], parts["delta"].astype(np.float32), parts["weight"])
    validate_update(update, shapes, max_weight=max_weight)
    for tu in update.values():
        tu.ids = tu.ids.astype(np.int64)
        tu.weight = tu.weight.astype(np.float32)
    return update


def dense_upload_bytes(shapes: Mapping[str, tuple[int, int]]) -> int:
    """Bytes of a dense float32 upload of every table: the raw values plus one npy header each.

    Computed, not serialized: a real dense upload's chunks would not deduplicate, so
    this is what Flower would carry for the arrays alone (framing excluded, as in
    :func:`record_bytes`).
    """
    return sum(int(np.prod(s)) * 4 + 128 for s in shapes.values())


def reply_content(
    status: str,
    cache_version: int,
    update_record: ArrayRecord | None,
    metrics: dict[str, float],
    train_stats: dict[str, float],
) -> RecordDict:
    """The record an organisation sends back (the one layout both sides agree on).

    Its records: ``info`` (status, cache version), ``metrics``, ``train`` (statistics of
    local training) and ``update`` (the row-sparse update). There is no record for a head:
    a head never leaves its organisation.
    """
    c = RecordDict({"info": ConfigRecord({"status": status, "cache_version": int(cache_version)})})
    if metrics:
        c["metrics"] = MetricRecord({k: float(v) for k, v in metrics.items()})
    if train_stats:
        c["train"] = MetricRecord({k: float(v) for k, v in train_stats.items()})
    if update_record is not None:
        c["update"] = update_record
    return c
