"""Storage: every path is an fsspec URI, and every write is atomic.

- ``settings``: the ``storage`` config section (endpoint, credentials, retries).
- ``fs``: which filesystem a URI names, client options, the first-contact probe.
- ``files``: read, write, publish, copy, remove, list; dry runs refuse writes.
- ``conditional``: compare-and-swap writes (S3 conditional PutObject, a local
  lock, or a settle-checked lease on stores that ignore the conditions).
- ``lease``: output leases (one job writes an output), built on ``conditional``.
- ``s3parse``: S3 list pages parsed for a fraction of botocore's CPU, with its results.

The names most callers need are re-exported here (``from pipeline import
storage as st``); leases are imported from ``pipeline.storage.lease``.
"""

from pipeline.storage.conditional import (CONFLICT_CODES, LEASE_SETTLE_S, LEASE_TERM_S, LeaseBusy, age_s,
                                          conditional_writes, read_for_update, write_if_unchanged)
from pipeline.storage.files import (ReadOnlyViolation, check_source, check_writable, copy_file, exists, full_uri,
                                    join, list_files, local_scratch, publish_file, read_bytes, read_json, read_only,
                                    read_text, relative, remove, size_of, write_bytes, write_json, write_text)
from pipeline.storage.fs import (TMP_MARK, StorageCheckFailed, absolute, describe_error, get_fs, get_fs_exact,
                                 is_local, probe_endpoint, probe_on_first_use, protocol, s3_bucket_key,
                                 storage_options)
from pipeline.storage.settings import StorageConfig

__all__ = [
    "CONFLICT_CODES", "LEASE_SETTLE_S", "LEASE_TERM_S", "TMP_MARK", "LeaseBusy", "ReadOnlyViolation",
    "StorageCheckFailed", "StorageConfig", "absolute", "age_s", "check_source", "check_writable",
    "conditional_writes", "copy_file", "describe_error", "exists", "full_uri", "get_fs", "get_fs_exact",
    "is_local", "join",
    "list_files", "local_scratch", "probe_endpoint", "probe_on_first_use", "protocol", "publish_file",
    "read_bytes", "read_for_update", "read_json", "read_only", "read_text", "relative", "remove",
    "s3_bucket_key", "size_of", "storage_options", "write_bytes", "write_if_unchanged", "write_json", "write_text",
]
