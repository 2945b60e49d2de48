"""inception-ray: prepare, train and score image classifiers on Ray."""

__version__ = "0.1.0"

from pipeline.runtime import native_logs as _native_logs

# Before anything imports TensorFlow: its native start-up notices are filtered
# (see pipeline.runtime.native_logs; INCEPTION_RAY_VERBOSE=1 or a job's -v shows them).
_native_logs.install()
