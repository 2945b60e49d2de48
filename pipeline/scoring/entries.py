"""Entries of a URI list (``--images list.txt|.csv|.parquet``): what each one
means and which ones are refused.

An entry is an absolute URI (``s3://bucket/key``), an absolute local path, or a
path relative to the list's folder. An ``s3://`` entry's key is everything
after the bucket, exactly as written: ``#``, ``?``, ``%``, ``+``, spaces inside
it and repeated or trailing ``/`` are part of the key (nothing is decoded;
only a line that starts with ``#`` is a comment, and whitespace around an
entry is dropped). A relative entry on an object store is appended to the
list's folder as written, unless it has ``.`` or ``..`` segments, which are
resolved. Refused, so that a list cannot make the job
read what its author could not name directly:

- a protocol other than the allowed ones: the list's own protocol, the output's
  protocol, and those in ``score.uri_protocols``; local paths only when the list
  itself is local (an ``http://`` entry would make every worker fetch arbitrary
  URLs);
- a relative entry that climbs above the list's folder with ``..``.

``check_entry`` is pure (no I/O), so the driver checks the head of each list
before Ray starts and the planning tasks check every entry before any image is
read.
"""

from __future__ import annotations

import posixpath
from typing import Iterable, Optional

from pipeline import storage as st

LOCAL_PROTOCOLS = ("file", "local")


class EntryRejected(ValueError):
    """A list entry that is not allowed; the message is one line naming it."""


def allowed_protocols(list_uri: str, output: str, extra: Iterable[str] = ()) -> frozenset[str]:
    protocols = {_family(st.protocol(list_uri)), _family(st.protocol(output))} | {_family(p) for p in extra}
    if not st.is_local(list_uri):
        protocols.discard("file")
    return frozenset(protocols)


def _family(protocol: str) -> str:
    protocol = protocol.lower()
    if protocol in LOCAL_PROTOCOLS:
        return "file"
    return "s3" if protocol in ("s3", "s3a") else protocol


def check_entry(entry: str, base: str, allowed: frozenset[str], where: str) -> Optional[str]:
    """The URI an entry names (``base`` is the list's folder, as a URI or local
    path), None for a blank line or a ``#`` comment; EntryRejected otherwise."""
    entry = entry.strip().lstrip("\ufeff")
    if not entry or entry.startswith("#"):
        return None
    if "\x00" in entry or "\n" in entry or "\r" in entry:
        raise EntryRejected(f"{where}: entry {entry!r} has control characters")
    if "://" in entry:
        protocol = _family(entry.split("://", 1)[0])
        if protocol not in allowed:
            raise EntryRejected(f"{where}: entry {_shown(entry)} uses {protocol}://, which this list may not name "
                                f"(allowed: {', '.join(sorted(allowed))}; add others with score.uri_protocols)")
        return entry
    if entry.startswith("/"):
        if "file" not in allowed:
            raise EntryRejected(f"{where}: entry {_shown(entry)} is a local path, which a list on "
                                f"{st.protocol(base)}:// may not name")
        return entry
    normal = posixpath.normpath(entry)
    if normal == ".." or normal.startswith("../"):
        raise EntryRejected(f"{where}: entry {_shown(entry)} climbs above the list's folder")
    if not st.is_local(base) and not {".", ".."} & set(entry.split("/")):
        # An object store's key as written after the list's folder: "a//b.jpg"
        # and "a/" are keys of their own (only "." and ".." are resolved).
        return f"{base}/{entry}"
    return st.join(base, normal)


def _shown(entry: str) -> str:
    return repr(entry if len(entry) <= 200 else entry[:200] + "...")
