"""Keys are keys: any key S3 accepts (repeated and trailing slashes, spaces,
``%``, ``#``, ``?``, ``+``, ``::``, unicode in NFC and NFD, 1,024 bytes) is
listed once, scored once, and its ``uri`` reads back that very object; local
file names with spaces, ``%``, ``#`` and unicode likewise.

Objects are put and read back with boto3 by bucket and key (never through
fsspec paths, which normalise some keys), against moto's S3 server."""

from __future__ import annotations

import json
import os
import unicodedata

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import score as score_job
from jobs._cli import run
from pipeline import storage as st
from pipeline.config import StorageConfig, load_config
from pipeline.scoring.commit import SUMMARY_NAME
from pipeline.scoring.decode import iter_files
from pipeline.scoring.entries import check_entry
from pipeline.scoring.listing import _list_base, iter_level, list_level
from pipeline.scoring.plan import plan_score, prepare_parts
from pipeline.scoring.parts import read_plan_chunk
from tests import imagefactory as fx
from tests import test_score

tiny_model = test_score.tiny_model  # the session fixture: a small untrained classifier

NFC = unicodedata.normalize("NFC", "café/ü.jpg")
NFD = unicodedata.normalize("NFD", "café/ü.jpg")


def long_key(prefix: str, size: int = 1024) -> str:
    """A key of exactly ``size`` bytes (UTF-8) under ``prefix``, ending in .jpg."""
    stem = "é" * ((size - len(prefix.encode()) - 4) // 2)
    key = prefix + stem + "k" * (size - len((prefix + stem + ".jpg").encode())) + ".jpg"
    assert len(key.encode("utf-8")) == size
    return key


# Image keys under imgs/: each must come out as exactly one row.
IMAGE_KEYS = [
    "imgs/plain.jpg",
    "imgs//a.jpg",
    "imgs///b.jpg",
    "imgs/x//c.jpg",
    "imgs/sub/d.png",
    "imgs/sp ace.jpg",
    "imgs/ lead.jpg",
    "imgs/a b.jpg",
    "imgs/a%20b.jpg",
    "imgs/100%.jpg",
    "imgs/h#1.jpg",
    "imgs/q?x=1&y=2.jpg",
    "imgs/v?versionId=3.jpg",
    "imgs/p+q.jpg",
    "imgs/a::b.jpg",
    "imgs/" + NFC,
    "imgs/" + NFD,
    long_key("imgs/long/"),
]
# Other keys under imgs/: folder markers (size 0), a key ending in "/" that is
# not an image name, whatever its bytes, and a text file.
OTHER_KEYS = {"imgs/sub/": b"", "imgs/x//": b"", "imgs/a.jpg/": fx.rgb_jpeg(), "imgs/readme.txt": b"text"}


def image_bytes(i: int, key: str) -> bytes:
    colour = ((37 * i) % 256, (91 * i + 40) % 256, (13 * i + 200) % 256)
    return fx.palette_png() if key.endswith(".png") else fx.rgb_jpeg(colour=colour, size=(40 + i, 30))


def put_tree(endpoint: str, bucket: str) -> dict[str, bytes]:
    """Put every key with boto3, exactly; returns {image key: its bytes}."""
    client = boto3.client("s3", endpoint_url=endpoint)
    images = {key: image_bytes(i, key) for i, key in enumerate(IMAGE_KEYS)}
    assert len(images) == len(IMAGE_KEYS) and NFC != NFD
    for key, data in {**images, **OTHER_KEYS}.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    stored = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
              for o in page.get("Contents", [])}
    assert stored == set(images) | set(OTHER_KEYS)  # the server keeps every key as given
    return images


def parse_s3(uri: str) -> tuple[str, str]:
    assert uri.startswith("s3://"), uri
    bucket, key = uri[len("s3://"):].split("/", 1)
    return bucket, key


def walk(root: str, plan_dir: str, max_levels: int = 50) -> tuple[list[str], list[str]]:
    """list_level from ``root`` down, one level at a time, at most
    ``max_levels`` levels (a listing that repeats a level fails, never hangs).
    Returns (levels listed, in order; image URIs in the plan files)."""
    storage = StorageConfig()
    todo, levels, uris = [root], [], []
    while todo and len(levels) < max_levels:
        prefix = todo.pop(0)
        levels.append(prefix)
        out = list_level(prefix, root, storage, plan_dir, rows_per_file=100)
        todo.extend(out["prefixes"])
        for part in out["parts"]:
            uris.extend(pq.read_table(os.path.join(plan_dir, part["plan_file"])).column("uri").to_pylist())
    assert not todo, f"still listing after {max_levels} levels: {levels[:8]} ..."
    return levels, uris


@pytest.fixture
def odd_bucket(s3_endpoint, s3_bucket):
    """s3_bucket, emptied with boto3 afterwards: s3fs's recursive remove
    cannot name keys such as imgs/x// (it strips their slashes)."""
    yield s3_bucket
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket[1]):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=s3_bucket[1], Key=obj["Key"])


# ---------------------------------------------------------------- no Ray


@pytest.mark.s3
def test_listing_keeps_common_prefixes_verbatim(s3_endpoint, odd_bucket, tmp_path):
    """imgs// is a level of its own below imgs/ (the old listing stripped its
    slash, got imgs/ back and listed it again, forever); every level is listed
    once and every image key is found once, verbatim."""
    _, bucket = odd_bucket
    images = put_tree(s3_endpoint, bucket)
    fs, _ = st.get_fs(f"s3://{bucket}/imgs", StorageConfig())
    level = list(iter_level(fs, f"{bucket}/imgs/"))
    assert ("dir", f"{bucket}/imgs//", 0) in level
    assert {n for k, n, _ in level if k == "dir"} == {f"{bucket}/imgs/{d}/" for d in
                                                     ["", "a.jpg", NFC.split("/")[0], NFD.split("/")[0],
                                                      "long", "sub", "x"]}

    levels, uris = walk(f"s3://{bucket}/imgs", str(tmp_path / "plan"))
    assert len(levels) == len(set(levels)), levels
    assert sorted(uris) == sorted(f"s3://{bucket}/{k}" for k in images)
    assert f"s3://{bucket}/imgs//" in levels and f"s3://{bucket}/imgs///" in levels
    assert f"s3://{bucket}/imgs/x//" in levels

    # The same tree, the same walk.
    assert walk(f"s3://{bucket}/imgs", str(tmp_path / "plan2")) == (levels, uris)


@pytest.mark.s3
def test_storage_layer_reads_each_key_exactly(s3_endpoint, odd_bucket):
    """st.read_bytes / st.size_of of s3://bucket/key give that object, for
    keys fsspec's paths would change (a trailing '/', '?versionId=', '::')."""
    _, bucket = odd_bucket
    images = put_tree(s3_endpoint, bucket)
    storage = StorageConfig()
    for key, data in {**images, **OTHER_KEYS}.items():
        uri = f"s3://{bucket}/{key}"
        assert st.read_bytes(uri, storage) == data, key
        assert st.size_of(uri, storage) == len(data), key
    with pytest.raises(FileNotFoundError):
        st.read_bytes(f"s3://{bucket}/imgs/x/", storage)  # not the key imgs/x//
    got = list(iter_files([f"s3://{bucket}/{k}" for k in images], [-1] * len(images), storage, max_bytes=1 << 20,
                          retry_s=5))
    assert got == list(images.values())


def test_list_entries_keep_s3_keys_as_written():
    """In a URI list, '#', '?', '%', '+' and repeated or trailing slashes are
    part of an s3:// key; relative entries are appended to the list's folder
    as written (only '.' and '..' are resolved, and climbing is still refused)."""
    allowed = frozenset({"s3"})
    for key in IMAGE_KEYS + list(OTHER_KEYS):
        assert check_entry(f"s3://b/{key}", "s3://b/lists", allowed, "l.txt") == f"s3://b/{key}"
    assert check_entry("# a comment", "s3://b/lists", allowed, "l.txt") is None
    assert check_entry("x//a#1.jpg", "s3://b/lists/", allowed, "l.txt") == "s3://b/lists//x//a#1.jpg"
    assert check_entry("x/./a.jpg", "s3://b/lists", allowed, "l.txt") == "s3://b/lists/x/a.jpg"
    with pytest.raises(ValueError, match="climbs above"):
        check_entry("x/../../a.jpg", "s3://b/lists", allowed, "l.txt")
    # The folder of the list lists//l.txt is lists// ("s3://b/lists/" + "/" + entry).
    base = _list_base("s3://b/lists//l.txt", StorageConfig())
    assert check_entry("a.jpg", base, allowed, "l.txt") == "s3://b/lists//a.jpg"


def test_local_names_with_odd_characters(tmp_path):
    """Local files named with spaces, '%', '#', '?', '::', '+' and unicode (NFC
    and NFD) are listed and read under their own names."""
    root = tmp_path / "my imgs"
    names = ["sp ace.jpg", "a%20b.jpg", "a b.jpg", "100%.jpg", "h#1.jpg", "q?x=1.jpg", "a::b.jpg", "p+q.jpg",
             NFC.replace("/", "-"), NFD.replace("/", "-"), "sub dir#1/é.jpg"]
    files = {n: image_bytes(i, n) for i, n in enumerate(names)}
    fx.write_tree(str(root), files)
    levels, uris = walk(str(root), str(tmp_path / "plan"))
    assert sorted(uris) == sorted(str(root / n) for n in names)
    got = list(iter_files(uris, [-1] * len(uris), StorageConfig(), max_bytes=1 << 20, retry_s=5))
    assert got == [files[os.path.relpath(u, root)] for u in uris]
    assert all(st.read_bytes(str(root / n), StorageConfig()) == data for n, data in files.items())


# ---------------------------------------------------------------- whole jobs


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(300)  # a listing that repeats a level never ends: fail instead
def test_score_odd_keys_each_once_and_uri_reads_back(ray_session, tiny_model, s3_endpoint, odd_bucket):
    """python -m jobs.score --images s3://bucket/imgs: one row per image key,
    no error rows, and each row's uri, parsed into bucket and key, reads back
    the uploaded bytes with boto3 and with the project's storage layer. A URI
    list of the same keys plans exactly the same URIs."""
    fs, bucket = odd_bucket
    images = put_tree(s3_endpoint, bucket)
    out = f"s3://{bucket}/scores"
    argv = ["--model", tiny_model, "--images", f"s3://{bucket}/imgs", "--output", out,
            "--set", "score.read_retry_s=5"]  # a key read wrongly fails the job in seconds, not minutes
    assert run(score_job.main, argv) == 0

    summary = json.loads(fs.cat_file(f"{bucket}/scores/{SUMMARY_NAME}"))
    assert summary["images"] == summary["scored"] == len(images)
    assert summary["errors"] == 0 and summary["ignored_files"] == 1  # readme.txt
    table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in sorted(fs.glob(f"{bucket}/scores/*.parquet")))
    rows = table.to_pylist()
    assert len(rows) == len(images)
    assert [r for r in rows if r["error"] is not None] == []
    assert sorted(parse_s3(r["uri"]) for r in rows) == sorted((bucket, k) for k in images)

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for row in rows:
        b, key = parse_s3(row["uri"])
        assert client.get_object(Bucket=b, Key=key)["Body"].read() == images[key], key
        assert st.read_bytes(row["uri"], StorageConfig()) == images[key], key

    # The same keys as a text list (s3:// URIs: '#' and '?' are key characters).
    lines = "# odd keys\n" + "".join(f"s3://{bucket}/{k}\n" for k in images)
    client.put_object(Bucket=bucket, Key="lists/odd.txt", Body=lines.encode("utf-8"))
    cfg = load_config(None, [f"storage.endpoint_url={s3_endpoint}"])  # for Ray Data's workers too
    plan = plan_score(cfg, tiny_model, f"s3://{bucket}/lists/odd.txt", f"s3://{bucket}/scores-list")
    prepare_parts(cfg, plan)
    planned = [u for p in plan.parts for u in read_plan_chunk(plan.plan_dir, p, cfg.storage).column("uri").to_pylist()]
    assert sorted(planned) == sorted(f"s3://{bucket}/{k}" for k in images)
