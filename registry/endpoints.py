"""Where the catalogue and the weights are: the value the service launchers resolve and the stores connect to.

It lives in the catalogue, not beside the launchers, so that the artifact store can be opened from it without
importing the code that starts servers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoints:
    """Resolved connection details of the catalogue database and the S3 server."""

    database_url: str
    s3_endpoint_url: str
    s3_access_key_id: str
    s3_secret_access_key: str
    s3_region: str
    s3_bucket: str
    s3_prefix: str
