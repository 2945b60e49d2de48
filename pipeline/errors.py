"""Exceptions that map to the jobs' exit codes (README, "Exit codes").

Entry points catch these and turn them into one clear line and an exit code, so
library code can raise them from anywhere without knowing about `sys.exit`.
"""


class UsageError(Exception):
    """Bad flag, bad config, missing input or unreadable storage: exit code 2."""

    exit_code = 2


class JobFailed(Exception):
    """The job started but could not finish: exit code 1."""

    exit_code = 1


class QualityGateFailed(Exception):
    """Training finished but a user-set quality gate was missed: exit code 3."""

    exit_code = 3
