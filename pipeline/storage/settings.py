"""Object storage settings (the ``storage`` section of the config).

Defined here, below the config, so that the storage package needs nothing of
the job config but this section; ``pipeline.config`` composes it.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class StorageConfig(BaseModel):
    """Object storage settings. Anything left unset comes from the standard AWS
    environment or profile (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    access_key_id: Optional[SecretStr] = None
    secret_access_key: Optional[SecretStr] = None
    session_token: Optional[SecretStr] = None
    anon: bool = False
    # Attempts per request (botocore "adaptive" retry mode) and the connect
    # timeout: a dead endpoint fails fast instead of hanging a job.
    max_attempts: int = Field(8, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)
