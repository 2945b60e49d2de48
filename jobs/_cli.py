"""What every entry point shares: common flags, logging, exit codes (Ray start-up
is ``pipeline.runtime.cluster``)."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import tomllib
import traceback
from pathlib import Path
from typing import Callable, Sequence

from pipeline.runtime import native_logs
from pipeline import storage as st
from pipeline.config import Config, load_config
from pipeline.errors import JobFailed, QualityGateFailed, UsageError

log = logging.getLogger("jobs")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 2, one line) instead of printing usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


PACKAGE = "inception-ray"

EPILOG = """\
--dry-run checks the inputs as a real run does, prints what would run and
exits 0 (2 on a usage or input error); it starts no Ray and writes nothing.
Exit codes: 0 success, 1 failed while running, 2 usage, configuration or input
error, 3 quality gate not met (jobs.train), 130 interrupted."""


def package_version() -> str:
    """The installed package's version; from pyproject.toml beside jobs/ when the
    code runs uninstalled (e.g. a Ray job's uploaded working dir)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
        if project["name"] == PACKAGE:
            return project["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    return "unknown"


def make_parser(prog: str, doc: str, *, config: bool = True,
                version_flags: Sequence[str] = ("-V", "--version")) -> argparse.ArgumentParser:
    """The job's parser: ``doc`` (the module docstring: a summary line and usage
    examples) is the help text, kept as written."""
    parser = _Parser(prog=prog, description=doc.strip("\n"), epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(*version_flags, action="version", version=f"{PACKAGE} {package_version()}",
                        help="print the package version and exit")
    if config:
        parser.add_argument("--config", metavar="FILE.yaml", help="experiment config (YAML, any fsspec URI)")
        parser.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value by dotted key (repeatable), e.g. --set train.transfer.epochs=3",
        )
        parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the inputs, print what would run and exit; start nothing, write nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also the start-up notices of TensorFlow and Ray that are hidden by default")
    return parser


def dry_run_report(job: str, lines: Sequence[str]) -> int:
    """Print a dry run's plan (after planning inside ``storage.read_only()``)."""
    print(f"dry run: {job} would")
    for line in lines:
        print(f"  {line}")
    print("nothing was started or written")
    return 0


def resolve_config(args: argparse.Namespace, flags: dict) -> Config:
    """defaults < --config file < --set overrides < flags."""
    flags = dict(flags)
    flags.setdefault("ray.address", getattr(args, "address", None))
    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", []), flags)
    if cfg.storage.endpoint_url is None:
        # Resolved here, on the driver, so that Ray workers on other nodes use the
        # same endpoint; credentials stay with each node's own AWS chain.
        cfg.storage.endpoint_url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return cfg


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    if verbose:
        os.environ[native_logs.VERBOSE_ENV] = "1"  # inherited by a local Ray's processes
        native_logs.uninstall()
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # TensorFlow's C++ start-up chatter hides the lines people need.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main`` and map exceptions to the exit codes (README, "Exit codes") with one clear line."""
    if argv is None and not {"-v", "--verbose"} & set(sys.argv[1:]):
        native_logs.filter_process_stderr()  # from the command line: notices filtered (pipeline.runtime.native_logs)
    # A dead endpoint or rejected credentials: one line within seconds, not
    # minutes of retries (the first request to each object store is a quick probe).
    st.probe_on_first_use()
    try:
        return main(sys.argv[1:] if argv is None else list(argv))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except st.StorageCheckFailed as exc:
        # Raised only by the first request to a store, i.e. while checking inputs:
        # unreadable storage is a usage error (exit 2), wherever it was touched first.
        print(f"error: {exc}", file=sys.stderr)
        return UsageError.exit_code
    except QualityGateFailed as exc:
        print(f"quality gate: {exc}", file=sys.stderr)
        return exc.exit_code
    except JobFailed as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the job failed while running
        traceback.print_exc()
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
