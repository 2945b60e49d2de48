"""List pages parsed the cheaper way (``pipeline.storage.s3parse``) give
exactly what botocore's own parser gives: on moto's answers (keys that need
escaping and URL encoding, folders, owners, single-key pages, StartAfter) and
on a page with elements the fast loop hands back to botocore (a tag twice, a
tag it does not know, nested structures)."""

from __future__ import annotations

import gc
from datetime import timezone

import boto3
import pytest
from botocore.parsers import RestXMLParser, create_parser
from botocore.session import get_session

from pipeline.config import StorageConfig
from pipeline.storage import get_fs_exact, s3parse

KEYS = ["imgs/a b.jpg", "imgs/caf\u00e9.jpg", "imgs/x&y<z>.jpg", "imgs/plus+sign.jpg", "imgs/pct%41.jpg",
        "imgs/sub/deep.jpg", "imgs/sub2/d.jpg", "imgs//double.jpg", "imgs/n-001.jpg", "imgs/n-002.jpg", "top.jpg"]


def _without_metadata(page: dict) -> dict:
    return {k: v for k, v in page.items() if k != "ResponseMetadata"}


@pytest.mark.s3
def test_pages_equal_botocores_on_s3_answers(s3_endpoint, s3_bucket):
    _, bucket = s3_bucket
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for i, key in enumerate(KEYS):
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * (i * 37))
    fs, _ = get_fs_exact(f"s3://{bucket}/", StorageConfig(endpoint_url=s3_endpoint))
    s3parse.fast_listing(fs)
    requests = [
        {"Prefix": "imgs/", "Delimiter": "/"},
        {"Prefix": "imgs/"},
        {"Prefix": "", "FetchOwner": True},
        {"Prefix": "imgs/", "MaxKeys": 1},
        {"Prefix": "imgs/", "MaxKeys": 3, "StartAfter": "imgs/caf\u00e9.jpg"},
        {"Prefix": "imgs/", "Delimiter": "/", "MaxKeys": 2},
    ]
    compared = 0
    for kwargs in requests:
        plain = _without_metadata(client.list_objects_v2(Bucket=bucket, **kwargs))
        fast = _without_metadata(fs.call_s3("list_objects_v2", Bucket=bucket, **kwargs))
        assert fast == plain, kwargs
        compared += len(plain.get("Contents", []))
        for obj in fast.get("Contents", []):
            assert obj["LastModified"].utcoffset().total_seconds() == 0
    assert compared > 20
    # The fast loop did the pages (not botocore's walk under another name).
    parser = fs.session.get_component("response_parser_factory").create_parser("rest-xml")
    assert type(parser).__name__.startswith("FastList")


NS = "http://s3.amazonaws.com/doc/2006-03-01/"
PAGE = f"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="{NS}"><Name>b</Name><Prefix>p/</Prefix><KeyCount>5</KeyCount><MaxKeys>1000</MaxKeys>
<IsTruncated>false</IsTruncated>
<Contents><Key>p/a.jpg</Key><LastModified>2026-01-02T03:04:05.678Z</LastModified><ETag>&quot;e1&quot;</ETag>
<Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>
<Contents><Key>p/b.jpg</Key><LastModified>2026-01-02T03:04:05+02:00</LastModified><ETag></ETag><Size>0</Size>
<ChecksumAlgorithm>CRC32</ChecksumAlgorithm><ChecksumAlgorithm>SHA256</ChecksumAlgorithm>
<Owner><DisplayName>me</DisplayName><ID>42</ID></Owner></Contents>
<Contents><Key>p/c.jpg</Key><LastModified>Fri, 02 Jan 2026 03:04:05 GMT</LastModified><Size>7</Size>
<RestoreStatus><IsRestoreInProgress>true</IsRestoreInProgress></RestoreStatus><Unheard>x</Unheard></Contents>
<Contents><Key>p/d.jpg</Key><Size>8</Size><ChecksumAlgorithm>CRC32C</ChecksumAlgorithm></Contents>
<Contents><Key>p/e.jpg</Key><ETag></ETag><Size>3</Size><StorageClass>GLACIER</StorageClass></Contents>
</ListBucketResult>""".encode()


def test_elements_the_loop_does_not_take_go_through_botocore():
    shape = get_session().get_service_model("s3").operation_model("ListObjectsV2").output_shape
    response = {"status_code": 200, "headers": {}, "body": PAGE}
    plain = create_parser("rest-xml")
    fast = s3parse._fast_list_mixin(RestXMLParser)()
    for stamp in (None, s3parse.parse_timestamp):
        if stamp is not None:
            plain, fast = RestXMLParser(timestamp_parser=stamp), s3parse._fast_list_mixin(RestXMLParser)(
                timestamp_parser=stamp)
        want, got = plain.parse(response, shape), fast.parse(response, shape)
        assert _without_metadata(got) == _without_metadata(want)
        assert got["Contents"][1]["ChecksumAlgorithm"] == ["CRC32", "SHA256"]
        assert got["Contents"][1]["Owner"] == {"DisplayName": "me", "ID": "42"}
        assert got["Contents"][2]["RestoreStatus"] == {"IsRestoreInProgress": True}
        assert got["Contents"][3] == {"Key": "p/d.jpg", "Size": 8, "ChecksumAlgorithm": ["CRC32C"]}
        assert got["Contents"][4] == {"Key": "p/e.jpg", "ETag": "", "Size": 3, "StorageClass": "GLACIER"}


def test_iso_timestamps_are_the_same_instants():
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    for text in ("2026-01-02T03:04:05.678Z", "2026-01-02T03:04:05Z", "2026-01-02T05:04:05+02:00",
                 "Fri, 02 Jan 2026 03:04:05 GMT", "1767323045"):
        ours, theirs = s3parse.parse_timestamp(text), DEFAULT_TIMESTAMP_PARSER(text)
        assert ours == theirs and ours.utcoffset().total_seconds() == 0  # the same instant, in UTC
    assert s3parse.parse_timestamp("2026-01-02T03:04:05Z").tzinfo == timezone.utc


def test_cycle_collection_paused_and_restored():
    assert gc.isenabled()
    with s3parse.cycle_collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with s3parse.cycle_collection_paused():
            pass
        assert not gc.isenabled()  # a caller's own choice is kept
    finally:
        gc.enable()
