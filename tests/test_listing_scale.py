"""Listing at scale, at test size, on moto's S3 server: a flat prefix split
into key ranges listed by several tasks at once, small folders packed into
few parts, parts scored while listing goes on (and a run stopped mid-listing
resumed without duplicates), and S3 Inventory manifests as ``--images``;
list pages parsed the cheaper way (``pipeline.storage.s3parse``) give exactly
what botocore's own parser gives: on moto's answers (keys that need escaping
and URL encoding, folders, owners, single-key pages, StartAfter) and on a page
with elements the fast loop hands back to botocore (a tag twice, a tag it does
not know, nested structures)."""

from __future__ import annotations

import gc
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.parsers import RestXMLParser
from botocore.session import get_session

from jobs import score as score_job
from jobs._cli import run
from pipeline.config import StorageConfig
from pipeline.errors import UsageError
from pipeline.scoring import listing
from pipeline.scoring.commit import SUMMARY_NAME
from pipeline.scoring.parts import PartSpec, read_plan_chunk
from pipeline.storage import get_fs_exact, s3parse
from tests.test_score import tiny_model  # noqa: F401 - the session fixture


def put_keys(endpoint: str, bucket: str, keys: list[str], body: bytes = b"") -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=body), keys))


def stored_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    return sorted(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                  for o in page.get("Contents", []))


def plan_uris(plan_dir: str, parts: list[dict]) -> list[str]:
    return [u for d in parts for u in read_plan_chunk(plan_dir, PartSpec(**d), StorageConfig()).column("uri").to_pylist()]


def test_split_points_are_inside_the_range_and_increasing():
    keys = [f"p/k-{i:06d}.jpg" for i in range(100_000)]
    rounds = []

    def probe(afters):
        import bisect
        rounds.append(len(afters))
        return [keys[i] if i < len(keys) else None for i in (bisect.bisect_right(keys, a) for a in afters)]

    points = listing.split_points(probe, "p/", keys[0], keys[999], None, sample=tuple(keys[:1000]))
    assert 2 <= len(points) <= listing.SPLIT_PIECES
    # The probes go out in rounds of requests made at once: 3 round trips
    # (the 4x ladder, two rounds narrowing the end), not one per probe.
    assert len(rounds) <= 3 and sum(rounds) <= listing.SPLIT_PROBES, rounds
    assert all(a < b for a, b in zip([keys[999], *points], points)) and points[-1] < "p/\x7f"
    # Roughly balanced: no piece holds more than half of what remains.
    import bisect
    cuts = [bisect.bisect_right(keys, p) for p in points]
    sizes = [b - a for a, b in zip([1000, *cuts], [*cuts, len(keys)])]
    assert max(sizes) <= len(keys) // 2, sizes
    # Little left: no split.
    assert listing.split_points(probe, "p/", keys[0], keys[999], keys[1400], sample=tuple(keys[:1000])) == []


@pytest.mark.s3
def test_flat_prefix_listed_by_overlapping_range_tasks(ray_session, s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    """1,200 keys in one folder, 100 keys a page: the first task splits the
    level into key ranges, other tasks list them at the same time; every key
    is in the plan exactly once. Without the split: one task."""
    _, bucket = s3_bucket
    keys = [f"flat/img-{i:05d}.jpg" for i in range(1200)] + ["flat/notes.txt", "flat/sub/x.jpg"]
    put_keys(s3_endpoint, bucket, keys)
    assert stored_keys(s3_endpoint, bucket, "flat/") == sorted(keys)
    monkeypatch.setattr(listing, "PAGE_KEYS", 100)
    root = f"s3://{bucket}/flat"
    expected = sorted(f"s3://{bucket}/{k}" for k in keys if k.endswith(".jpg"))
    for split in (True, False):
        stats = {"record": []}
        plan_dir = str(tmp_path / f"plan-{split}")
        parts = list(listing.iter_prefix(root, StorageConfig(endpoint_url=s3_endpoint), plan_dir, 300, 8, stats,
                                           split=split))
        uris = plan_uris(plan_dir, parts)
        assert sorted(uris) == expected and len(set(uris)) == len(uris)
        assert stats["ignored"] == 1
        level = [r for r in stats["record"] if r["range"][0].endswith("/flat/")]
        if not split:
            assert len(level) == 1 and level[0]["range"][1:] == (None, None)
            continue
        assert len(level) > 2, level
        # The ranges partition the level: each starts where another ended.
        ranges = sorted((r["range"][1:] for r in level), key=lambda r: r[0] or "")
        assert ranges[0][0] is None and ranges[-1][1] is None
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), ranges
        assert any(r["handed"] for r in level)
        # Range tasks ran at the same time (each records when it ran).
        spans = sorted(r["took"] for r in level)
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans


@pytest.mark.s3
def test_small_folders_are_packed_into_few_parts(ray_session, s3_endpoint, s3_bucket, tmp_path):
    _, bucket = s3_bucket
    keys = [f"many/f{a:03d}/i{i}.jpg" for a in range(60) for i in range(7)]
    put_keys(s3_endpoint, bucket, keys)
    plan_dir = str(tmp_path / "plan")
    parts, _, tasks = listing.list_prefix(f"s3://{bucket}/many", StorageConfig(endpoint_url=s3_endpoint),
                                         plan_dir, 100, 16)
    assert tasks == 61
    uris = plan_uris(plan_dir, parts)
    assert sorted(uris) == sorted(f"s3://{bucket}/{k}" for k in keys) and len(set(uris)) == len(uris)
    assert len(parts) == 5 and sorted(d["rows"] for d in parts) == [20, 100, 100, 100, 100]
    for d in parts:  # sorted within a part, named by its URIs
        got = read_plan_chunk(plan_dir, PartSpec(**d), StorageConfig()).column("uri").to_pylist()
        assert got == sorted(got)


def test_checks_before_ray_make_as_many_requests_for_a_large_prefix_as_for_a_small_one(tiny_model, tmp_path):
    """``plan_score`` looks at a prefix before Ray starts (a list or a
    folder? does it exist, is it a folder, does its first level hold an image
    or a folder?) in a few requests, however many keys or sub-folders it
    holds: s3fs's ``isdir`` had listed the whole level, every page, into its
    cache (200 requests for 200,000 keys, 21 s at 30 ms a request, before
    anything could start), and a level of folders was listed to its end.
    Counted by the bench server, which answers pages of 1,000 keys."""
    from pipeline.config import load_config
    from pipeline.scoring.plan import plan_score
    from tests.benchmarks.s3server import S3Server

    requests: dict = {}
    for n in (3, 5000):
        keys = [f"flat/img-{i:05d}.jpg" for i in range(n)] + [f"deep/d{i:05d}/img.jpg" for i in range(n)]
        with S3Server({"bench": keys}) as server:
            cfg = load_config(None, [f"storage.endpoint_url={server.endpoint}"])
            for prefix in ("flat", "deep"):
                server.reset()
                plan = plan_score(cfg, tiny_model, f"s3://bench/{prefix}", str(tmp_path / f"out-{prefix}-{n}"))
                assert not plan.is_list
                requests[prefix, n] = server.stats()
            with pytest.raises(UsageError, match="source not found"):
                plan_score(cfg, tiny_model, "s3://bench/none", str(tmp_path / "out"))
            with pytest.raises(UsageError, match="is a file"):
                plan_score(cfg, tiny_model, "s3://bench/flat/img-00001.jpg", str(tmp_path / "out"))
    for prefix in ("flat", "deep"):
        assert requests[prefix, 5000] == requests[prefix, 3], requests
        # A handful: list or folder (a HEAD, s3fs's directory check), the
        # source check, the first page of the level, the part-size sample
        # (source check, one page); s3fs may add one of its own (seen once,
        # in a process that ran other S3 tests before).
        assert sum(requests[prefix, 3].values()) <= 8, requests


@pytest.mark.slow
@pytest.mark.s3
def test_parts_scored_while_listing_and_a_run_stopped_mid_listing_resumes(ray_session, tiny_model, s3_endpoint,
                                                                          s3_bucket, tmp_path, monkeypatch):
    """40 folders of 30 empty image files (error rows, no model), one listing
    task at a time: the first run fails on purpose right after a part is
    committed while listing still goes on (a fault point reached only then),
    before plan.json exists. The second run lists again, keeps the parts
    committed before (same URIs, same file), scores the rest while it lists
    (its first part committed before its listing ended) and leaves one row per
    image."""
    from pipeline.runtime.faults import FAULT_ENV

    fs, bucket = s3_bucket
    keys = [f"deep/f{a:02d}/img-{i:02d}.jpg" for a in range(40) for i in range(30)]
    put_keys(s3_endpoint, bucket, keys)
    out = f"s3://{bucket}/scores"
    argv = ["--model", tiny_model, "--images", f"s3://{bucket}/deep", "--output", out, "--rows-per-file", "30",
            "--set", "score.list_concurrency=1"]
    from pipeline.scoring.progress import Progress

    # Whether scoring overlaps listing must not depend on how fast the
    # predictors start: the listing (a thread of the driver) holds, once it
    # has handed out `hold_after` parts, until a part is committed. Without
    # the overlap the job would wait for the whole listing first and the hold
    # would never end before its 120 s.
    committed, hold_after = threading.Event(), [1]
    real_done, real_iter = Progress.part_done, listing.iter_prefix

    def part_done(self, *args, **kwargs):
        committed.set()
        return real_done(self, *args, **kwargs)

    def held(*args, **kwargs):
        for n, d in enumerate(real_iter(*args, **kwargs)):
            yield d
            if n + 1 >= hold_after[0] and not committed.is_set():
                assert committed.wait(120), "no part was committed while listing went on"

    monkeypatch.setattr(Progress, "part_done", part_done)
    monkeypatch.setattr(listing, "iter_prefix", held)
    marker = tmp_path / "fault"
    monkeypatch.setenv(FAULT_ENV, f"score-part-committed-while-listing:raise:{marker}")
    assert run(score_job.main, argv) != 0
    assert marker.exists()  # a part was committed while listing went on
    monkeypatch.delenv(FAULT_ENV)
    assert not fs.exists(f"{bucket}/scores/_plan/plan.json")
    before = set(fs.glob(f"{bucket}/scores/part-*.parquet"))
    assert 1 <= len(before) < 40
    committed.clear()
    hold_after[0] = len(before) + 1  # at least one of them is a part to score

    assert run(score_job.main, argv) == 1  # every row an error (empty files)
    summary = json.loads(fs.cat_file(f"{bucket}/scores/{SUMMARY_NAME}"))
    assert summary["status"] == "complete" and summary["images"] == len(keys) and summary["files"] == 40
    assert summary["files_kept"] >= len(before) - 1 and summary["files_kept"] >= 1
    assert summary["files_written"] + summary["files_kept"] == 40
    assert summary["first_part_committed_s"] < summary["listing_ended_s"], summary
    parts = fs.glob(f"{bucket}/scores/part-*.parquet")
    assert len(parts) == 40
    table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in parts)
    assert sorted(table["uri"].to_pylist()) == sorted(f"s3://{bucket}/{k}" for k in keys)
    plan = json.loads(fs.cat_file(f"{bucket}/scores/_plan/plan.json"))
    assert sorted(p["index"] for p in plan["parts"]) == sorted(int(f.rsplit("/", 1)[1].split("-")[1]) for f in parts)


@pytest.mark.slow
@pytest.mark.s3
def test_s3_inventory_manifests_csv_and_parquet(ray_session, tiny_model, s3_endpoint, s3_bucket):
    """--images .../manifest.json: an S3 Inventory of 2 gzip CSV files (no
    header, URL-encoded keys: '+' and %20 for spaces, %2B for '+') and one of
    a Parquet file (plain keys); every image listed is scored once, other
    keys are left out."""
    import gzip
    from urllib.parse import quote, quote_plus

    from tests import imagefactory as fx

    fs, bucket = s3_bucket
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    images = {f"photos/{name}": fx.rgb_jpeg(colour=(20 * i, 90, 200 - 20 * i), size=(30 + i, 24))
              for i, name in enumerate(["plain.jpg", "a b.jpg", "p+q.jpg", "100%.jpg", "x y/z+1.png", "dé.jpg"])}
    for key, data in images.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    keys = sorted(images) + ["photos/readme.txt", "photos/sub/"]
    rows = [(bucket, k, len(images.get(k, b"")), "2026-01-01T00:00:00.000Z") for k in keys]

    def csv_file(part, encode):
        lines = "".join(f'"{b}","{encode(k)}","{s}","{t}"\n' for b, k, s, t in part)
        return gzip.compress(lines.encode())

    files = {"inv/data/one.csv.gz": csv_file(rows[:4], quote_plus), "inv/data/two.csv.gz": csv_file(rows[4:], quote)}
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    manifest = {"sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{bucket}", "fileFormat": "CSV",
                "fileSchema": "Bucket, Key, Size, LastModifiedDate",
                "files": [{"key": k, "size": len(v), "MD5checksum": "0"} for k, v in files.items()]}
    client.put_object(Bucket=bucket, Key="inv/csv/manifest.json", Body=json.dumps(manifest).encode())
    table = pa.table({"bucket": [r[0] for r in rows], "key": [r[1] for r in rows], "size": [r[2] for r in rows]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    client.put_object(Bucket=bucket, Key="inv/data/all.parquet", Body=sink.getvalue().to_pybytes())
    manifest = {**manifest, "fileFormat": "Parquet", "fileSchema": "message s3.inventory { required binary bucket; }",
                "files": [{"key": "inv/data/all.parquet", "size": 1, "MD5checksum": "0"}]}
    client.put_object(Bucket=bucket, Key="inv/parquet/manifest.json", Body=json.dumps(manifest).encode())

    expected = sorted(f"s3://{bucket}/{k}" for k in images)
    for kind in ("csv", "parquet"):
        out = f"s3://{bucket}/scores-{kind}"
        argv = ["--model", tiny_model, "--images", f"s3://{bucket}/inv/{kind}/manifest.json", "--output", out,
                "--rows-per-file", "4"]
        assert run(score_job.main, argv) == 0, kind
        got = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in fs.glob(f"{bucket}/scores-{kind}/*.parquet"))
        assert sorted(got["uri"].to_pylist()) == expected, kind
        assert set(got["error"].to_pylist()) == {None}, kind
        summary = json.loads(fs.cat_file(f"{bucket}/scores-{kind}/{SUMMARY_NAME}"))
        assert summary["images"] == summary["scored"] == len(images)


# ---------------------------------------------------------------- list pages parsed (storage.s3parse)


PARSE_KEYS = ["imgs/a b.jpg", "imgs/caf\u00e9.jpg", "imgs/x&y<z>.jpg", "imgs/plus+sign.jpg", "imgs/pct%41.jpg",
              "imgs/sub/deep.jpg", "imgs/sub2/d.jpg", "imgs//double.jpg", "imgs/n-001.jpg", "imgs/n-002.jpg",
              "top.jpg"]


def _without_metadata(page: dict) -> dict:
    return {k: v for k, v in page.items() if k != "ResponseMetadata"}


@pytest.mark.s3
def test_pages_equal_botocores_on_s3_answers(s3_endpoint, s3_bucket):
    _, bucket = s3_bucket
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for i, key in enumerate(PARSE_KEYS):
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
    for options in ({}, {"timestamp_parser": s3parse.parse_timestamp}):
        plain, fast = RestXMLParser(**options), s3parse._fast_list_mixin(RestXMLParser)(**options)
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


def test_a_listing_task_runs_with_the_cycle_collector_paused(tmp_path, monkeypatch):
    """A page's objects would set off collections of the whole worker (a
    third of a listing task's CPU); the task pauses the collector, and only
    while it runs."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    seen = []
    real = listing.write_plan_chunk
    monkeypatch.setattr(listing, "write_plan_chunk", lambda *a, **k: seen.append(gc.isenabled()) or real(*a, **k))
    result = listing.list_level(str(tmp_path / "imgs"), str(tmp_path / "imgs"), StorageConfig(),
                                str(tmp_path / "plan"), 10)
    assert result["files"] == 1 and seen == [False] and gc.isenabled()


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
