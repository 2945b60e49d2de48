"""Cheaper parsing of S3 list pages, with botocore's own results.

A ``ListObjectsV2`` page of 1,000 keys cost an s3fs client about 33 ms of CPU
on the machine these numbers come from: about 12 ms Python's cycle collector
set off by the page's new objects, about 9 ms botocore's generic walk of the
response model for each key (``_handle_structure``: every member's
serialization looked up for every key), a few ms the XML itself. Listing a
large prefix is bound by that CPU once the requests overlap. ``fast_listing``
gives one s3fs filesystem's client:

- ISO 8601 timestamps (each key's ``LastModified``) parsed by
  ``datetime.fromisoformat`` rather than dateutil (the same instants, in UTC);
  other timestamps (HTTP dates of HEAD/GET) as before;
- lists of flat structures (a page's ``Contents``) turned into dicts by a loop
  that resolves each member's tag and type once per list instead of once per
  element (strings, integers and timestamps converted as botocore converts
  them, other members by its own handlers); an element that is
  not plain (a tag twice, anything the loop does not know) goes through
  botocore's generic path, as does every other shape. The results are equal
  to botocore's (tested against its own parser on S3 server answers).

``cycle_collection_paused`` is the collector's part: listing tasks run with it.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


def parse_timestamp(value: str):
    """An ISO 8601 timestamp by ``datetime.fromisoformat``; anything else by
    botocore's own parser."""
    from datetime import datetime, timezone

    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

        return DEFAULT_TIMESTAMP_PARSER(value)
    return parsed.astimezone(timezone.utc)


_SCALARS = ("string", "integer", "long", "boolean", "timestamp", "float", "double")


def _flat_members(parser, shape) -> dict | None:
    """{xml tag: (member name, handler, member shape)} for a list member shape
    that the loop can take (a structure of body members, no union, no
    exception), else None. Body strings, integers and timestamps map to the
    kinds the loop converts itself; other scalars to the parser's own
    ``_handle_*``, nested members to its ``_parse_shape`` (a single element:
    as botocore's walk passes it)."""
    if shape.type_name != "structure" or shape.metadata.get("exception") or getattr(shape, "is_tagged_union", False):
        return None
    from botocore.utils import is_json_value_header

    plan = {}
    for name, member in shape.members.items():
        ser = member.serialization
        if ser.get("location") or ser.get("eventheader") or ser.get("xmlAttribute") or ser.get("xmlNamespace"):
            return None
        tag = parser._member_key_name(member, name)
        kind = member.type_name
        if kind == "string" and not is_json_value_header(member):
            plan[tag] = (name, _TEXT, member)  # what _handle_string returns for a body member
        elif kind in ("integer", "long"):
            plan[tag] = (name, _INT, member)
        elif kind == "timestamp":
            plan[tag] = (name, _TIMESTAMP, member)
        elif kind in _SCALARS:
            plan[tag] = (name, getattr(parser, f"_handle_{kind}"), member)
        else:
            plan[tag] = (name, parser._parse_shape, member)
    return plan


_TEXT, _INT, _TIMESTAMP = "text", "int", "timestamp"  # kinds the loop converts itself, as botocore does


def _fast_list_mixin(base: type) -> type:
    class FastListParser(base):
        def _handle_list(self, shape, node):
            if not isinstance(node, list) or len(node) < 2:
                return super()._handle_list(shape, node)
            plan = _flat_members(self, shape.member)
            if plan is None or shape.serialization.get("location"):
                return super()._handle_list(shape, node)
            generic = super()._parse_shape
            stamp = self._timestamp_parser
            out = []
            for item in node:
                if item is None:
                    out.append(None)
                    continue
                parsed = {}
                for child in item:
                    tag = child.tag.rpartition("}")[2]
                    entry = plan.get(tag)
                    if entry is None or entry[0] in parsed:  # unknown or repeated: botocore's own walk
                        parsed = generic(shape.member, item)
                        break
                    name, handle, member = entry
                    text = child.text
                    if handle is _TEXT:
                        parsed[name] = "" if text is None else text
                    elif handle is _INT:
                        parsed[name] = int("" if text is None else text)
                    elif handle is _TIMESTAMP:
                        parsed[name] = stamp("" if text is None else text)
                    else:
                        parsed[name] = handle(member, child)
                out.append(parsed)
            return out

    FastListParser.__name__ = f"FastList{base.__name__}"
    return FastListParser


def fast_listing(fs) -> None:
    """This s3fs filesystem's client parses list pages the cheaper way (see
    the module). Once per filesystem instance."""
    if getattr(fs, "_fast_listing", False):
        return
    fs.connect()
    factory = fs.session.get_component("response_parser_factory")
    factory.set_parser_defaults(timestamp_parser=parse_timestamp)
    plain = factory.create_parser
    classes: dict = {}

    def create_parser(protocol_name):
        parser = plain(protocol_name)
        if protocol_name == "rest-xml":
            cls = type(parser)
            if cls not in classes:
                classes[cls] = _fast_list_mixin(cls)
            parser.__class__ = classes[cls]  # the same parser, one method more
        return parser

    factory.create_parser = create_parser
    fs._fast_listing = True


@contextlib.contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """Python's cycle collector paused (a listing task's pages are some
    10,000 new objects each, which set off collections that walk every object
    of the process: about a third of a task's CPU). What a page leaves is
    freed by reference counting (it forms no cycles); the collector resumes
    at the end."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
