"""Config resolution: defaults < file < --set < flags; unknown keys and wrong types
are usage errors (exit 2) that name the key; secrets never reach a dump."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from pipeline.config import REDACTED, load_config
from pipeline.errors import UsageError


def test_override_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("prepare:\n  val_fraction: 0.3\n  shard_size_mb: 50\n  png_compress_level: 3\n")
    cfg = load_config(
        str(path),
        ["prepare.shard_size_mb=20", "prepare.png_compress_level=6"],
        {"prepare.png_compress_level": 9, "prepare.max_side": None},
    )
    assert cfg.prepare.val_fraction == 0.3  # file over default
    assert cfg.prepare.shard_size_mb == 20  # --set over file
    assert cfg.prepare.png_compress_level == 9  # flag over --set
    assert cfg.prepare.max_side is None  # a flag not given changes nothing
    assert cfg.prepare.min_shards == 4  # default


@pytest.mark.parametrize(
    "override, message",
    [
        ("prepare.shard_sise_mb=3", "unknown config key 'prepare.shard_sise_mb'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("prepare.min_shards=many", "config key 'prepare.min_shards'"),
        ("prepare.val_fraction=1.5", "config key 'prepare.val_fraction'"),
        ("prepare.val_fraction.x=1", "config key 'prepare.val_fraction'"),
        ("justakey", "--set expects key=value"),
        ("train.steps_per_execution=0", "config key 'train.steps_per_execution': Input should be greater"),
        ("train.steps_per_execution=often", "config key 'train.steps_per_execution'"),
        ("train.precision=float8", "config key 'train.precision'"),
        ("scaling.collective=mpi", "config key 'scaling.collective'"),
        ("data.cpu_threads=0", "config key 'data.cpu_threads'"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("storage:\n  endpoint: http://x\n")
    with pytest.raises(UsageError, match=r"unknown config key 'storage\.endpoint'"):
        load_config(str(path))


def test_secrets_are_redacted_in_dumps():
    cfg = load_config(None, ["storage.secret_access_key=SENTINEL-123", "storage.access_key_id=AKIDSENTINEL"])
    text = cfg.to_yaml()
    assert "SENTINEL" not in text
    assert yaml.safe_load(text)["storage"]["secret_access_key"] == REDACTED
    assert cfg.storage.secret_access_key.get_secret_value() == "SENTINEL-123"
    assert "SENTINEL" not in repr(cfg)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "prepare.bogus=1"], "unknown config key 'prepare.bogus'"),
        (["--shard-size-mb", "-5"], "config key 'prepare.shard_size_mb'"),
        (["--val-fraction", "abc"], "--val-fraction: invalid float value"),
        (["--config", "/nonexistent/exp.yaml"], "config file not found"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(tmp_path, args, message):
    src = tmp_path / "src"
    src.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "--src", str(src), "--dst", str(tmp_path / "dst"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_training_workers_start_with_the_configured_heap_pad(tmp_path):
    from pipeline.training.driver import worker_env

    env = worker_env(load_config(None, []))
    assert env["MALLOC_TOP_PAD_"] == str(256 * 2**20) and env["TF_USE_LEGACY_KERAS"] == "1"
    assert "MALLOC_TOP_PAD_" not in worker_env(load_config(None, ["scaling.worker_malloc_top_pad_mb=0"]))
    with pytest.raises(UsageError, match="scaling.worker_malloc_top_pad_mb"):
        load_config(None, ["scaling.worker_malloc_top_pad_mb=-1"])


def test_scaled_jpeg_decoding_is_on_by_default_and_null_turns_it_off(tmp_path):
    """New shards decode large JPEGs at a DCT scale (prepare.jpeg_scale_to 299,
    InceptionV3's input); `null`, from --set or a file, is a full-size decode."""
    assert load_config(None, []).prepare.jpeg_scale_to == 299
    assert load_config(None, ["prepare.jpeg_scale_to=null"]).prepare.jpeg_scale_to is None
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  jpeg_scale_to: null\n")
    assert load_config(str(path)).prepare.jpeg_scale_to is None
