"""Upper bounds on reply sizes, so a call whose reply could not be sent is refused before the work.

gRPC refuses to send a message above ``grpc.max_send_message_length``, but only after the handler
has computed it (a NearestBatch of 1024 queries at k = 1000 searched for seconds, then failed
RESOURCE_EXHAUSTED "Sent message larger than max"). The bound here is computed from the request
alone: queries x k x the most bytes one neighbour can take, ids bounded by the served bank's longest
id (:func:`max_id_bytes`, computed once per bank). A bound, not an estimate: every singular scalar
field of the reply messages counts as set to its longest encoding.

A call that fails the check is answered INVALID_ARGUMENT (field ``queries``), not RESOURCE_EXHAUSTED:
nothing is exhausted that a retry could find free; the same request fails the same way until the
caller asks for fewer queries or a smaller k, which the message says (how many fit).
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from latentsearch.bank import MAX_ID_LENGTH, PosteriorBank
from latentsearch.errors import InvalidArgumentError
from latentsearch.v1 import latentsearch_pb2 as pb

__all__ = [
    "batch_reply_bound",
    "check_batch_reply",
    "label_name_bytes",
    "max_id_bytes",
    "nearest_reply_bound",
]

_MiB = 1024 * 1024
# A string field with no known bound counts as the longest id could be (MAX_ID_LENGTH characters of
# up to 4 UTF-8 bytes each): conservative, so a new string field never makes the bound wrong.
_UNKNOWN_STRING_BYTES = 4 * MAX_ID_LENGTH
# Most bytes of a value by wire type (varints of negative int32/int64/enum values take 10).
_FIXED_BYTES = {
    FieldDescriptor.TYPE_DOUBLE: 8,
    FieldDescriptor.TYPE_FIXED64: 8,
    FieldDescriptor.TYPE_SFIXED64: 8,
    FieldDescriptor.TYPE_FLOAT: 4,
    FieldDescriptor.TYPE_FIXED32: 4,
    FieldDescriptor.TYPE_SFIXED32: 4,
    FieldDescriptor.TYPE_BOOL: 1,
    FieldDescriptor.TYPE_UINT32: 5,
    FieldDescriptor.TYPE_INT32: 10,
    FieldDescriptor.TYPE_INT64: 10,
    FieldDescriptor.TYPE_UINT64: 10,
    FieldDescriptor.TYPE_SINT32: 5,
    FieldDescriptor.TYPE_SINT64: 10,
    FieldDescriptor.TYPE_ENUM: 10,
}

_id_bytes_cache: weakref.WeakKeyDictionary[PosteriorBank, int] = weakref.WeakKeyDictionary()
_id_bytes_lock = threading.Lock()


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _length_delimited(payload: int, number: int) -> int:
    """Bytes of one length-delimited field (tag, length, payload) of ``payload`` bytes."""
    return _varint_len(number << 3) + _varint_len(payload) + payload


def _scalar_bound(descriptor: Descriptor, strings: Mapping[str, int]) -> int:
    """Most bytes of ``descriptor``'s singular scalar fields, every one set to its longest value.

    ``strings`` bounds string and bytes fields by name (others: :data:`_UNKNOWN_STRING_BYTES`).
    Repeated and message fields are not counted (the callers add the ones they know).
    """
    total = 0
    for field in descriptor.fields:
        if field.is_repeated or field.type in (
            FieldDescriptor.TYPE_MESSAGE,
            FieldDescriptor.TYPE_GROUP,
        ):
            continue
        if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            total += _length_delimited(strings.get(field.name, _UNKNOWN_STRING_BYTES), field.number)
        else:
            total += _varint_len(field.number << 3) + _FIXED_BYTES[field.type]
    return total


def max_id_bytes(bank: PosteriorBank) -> int:
    """The most UTF-8 bytes any id of ``bank`` takes (computed once per bank, vectorised).

    For a unicode id array: its width in characters times the bytes its largest code point needs
    (an upper bound, exact for ASCII ids of equal length); for row-number ids: the digits of the last.
    """
    with _id_bytes_lock:
        cached = _id_bytes_cache.get(bank)
    if cached is not None:
        return cached
    ids = bank.ids
    if ids is None:
        size = len(str(max(len(bank) - 1, 0)))
    elif ids.dtype.kind == "U" and ids.size:
        chars = ids.dtype.itemsize // 4
        top = int(np.ascontiguousarray(ids).view(np.uint32).max()) if chars else 0
        size = chars * (1 if top < 0x80 else 2 if top < 0x800 else 3 if top < 0x10000 else 4)
    elif ids.size:  # any other dtype: measure (not written by this project)
        size = max(len(str(v).encode()) for v in ids.tolist())
    else:
        size = 0
    with _id_bytes_lock:
        _id_bytes_cache[bank] = size
    return size


def label_name_bytes(names: Sequence[str] | None) -> int:
    """The most UTF-8 bytes of any of ``names`` (0: none)."""
    return max((len(n.encode()) for n in names), default=0) if names else 0


def nearest_reply_bound(k: int, id_bytes: int, version: str, name_bytes: int = 0) -> int:
    """Most bytes of one NearestResponse with ``k`` neighbours, ids of at most ``id_bytes`` bytes and
    label names of at most ``name_bytes`` (0: the reply carries none)."""
    strings = {"id": id_bytes, "label_name": name_bytes}
    neighbor = _scalar_bound(pb.Neighbor.DESCRIPTOR, strings)
    if not name_bytes:  # not set at all, not even as an empty string
        neighbor -= _length_delimited(0, pb.Neighbor.DESCRIPTOR.fields_by_name["label_name"].number)
    fixed = _scalar_bound(pb.NearestResponse.DESCRIPTOR, {"index_version": len(version.encode())})
    number = pb.NearestResponse.DESCRIPTOR.fields_by_name["neighbors"].number
    return fixed + k * _length_delimited(neighbor, number)


def batch_reply_bound(ks: Iterable[int], id_bytes: int, version: str, name_bytes: int = 0) -> int:
    """Most bytes of a NearestBatchResponse answering one query per entry of ``ks`` (its k)."""
    number = pb.NearestBatchResponse.DESCRIPTOR.fields_by_name["results"].number
    total = _scalar_bound(pb.NearestBatchResponse.DESCRIPTOR, {"index_version": len(version.encode())})
    for k, count in Counter(ks).items():
        total += count * _length_delimited(nearest_reply_bound(k, id_bytes, version, name_bytes), number)
    return total


def check_batch_reply(
    ks: list[int],
    bank: PosteriorBank,
    version: str,
    limit: int,
    *,
    label_names: Sequence[str] | None = None,
) -> None:
    """Refuse a NearestBatch whose reply could exceed ``limit`` bytes (the max send message size).

    ``ks``: each query's k; ``label_names``: the names its replies may carry (``None``: none asked).

    Raises:
        InvalidArgumentError: field ``queries``; the message names queries and k, the bound and the
            limit, and how many queries at the batch's largest k would fit.
    """
    id_bytes, name_bytes = max_id_bytes(bank), label_name_bytes(label_names)
    bound = batch_reply_bound(ks, id_bytes, version, name_bytes)
    if bound <= limit:
        return
    k = max(ks)
    empty = batch_reply_bound([], id_bytes, version)
    one = batch_reply_bound([k], id_bytes, version, name_bytes) - empty
    fit = max(0, (limit - empty) // one)
    raise InvalidArgumentError(
        f"the reply to {len(ks)} queries with k up to {k} could take {bound / _MiB:.1f} MiB "
        f"(ids of up to {id_bytes} bytes), more than the {limit / _MiB:.1f} MiB this server sends in "
        f"one message; send fewer queries or a smaller k (at most {fit} queries at k = {k})",
        field="queries",
    )
