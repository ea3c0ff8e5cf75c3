"""What a local S3 server is configured with: its identities (key pairs and the actions each may perform),
the tunable ``weed mini`` flags, and the error raised when the server cannot be found, started or stopped."""

from __future__ import annotations

import dataclasses
from typing import Any

from s3ckpt.errors import S3CheckpointError

DEFAULT_ACCESS_KEY = "s3ckpt-local"
READ_ONLY_ACTIONS = ("Read", "List")


class ServerError(S3CheckpointError, RuntimeError):
    """The local S3 server could not be found, started or stopped."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """One S3 identity (user) of the server: its key pair and the actions it may perform.

    Args:
        name: Unique identity name.
        access_key: Access key id; unique across the server's identities.
        secret_key: Secret access key (kept out of ``repr``).
        actions: SeaweedFS actions; ``READ_ONLY_ACTIONS`` gives a reader that cannot write.
    """

    name: str
    access_key: str
    secret_key: str = dataclasses.field(repr=False)
    actions: tuple[str, ...] = ("Admin", "Read", "Write", "List", "Tagging")


def _flag(name: str, default: bool | int) -> Any:
    return dataclasses.field(default=default, metadata={"flag": name})


@dataclasses.dataclass(frozen=True)
class ServerFlags:
    """Every ``weed mini`` setting besides ports, paths and credentials, so a benchmark can tune them.

    Attributes:
        extra: Raw flags appended last (a repeated flag takes its last value).
    """

    # No phone-home: these machines are offline, and a test run is nobody's usage statistic.
    telemetry: bool = _flag("master.telemetry", False)
    # mini always starts the admin server (on a port we pick); nothing here uses its web UI.
    admin_ui: bool = _flag("admin.ui", False)
    # WebDAV, Iceberg and Lance listen on fixed default ports (7333, 8181, 9101): two servers would clash.
    webdav: bool = _flag("webdav", False)
    iceberg_port: int = _flag("s3.port.iceberg", 0)
    lance_port: int = _flag("s3.port.lance", 0)
    # mini derives the volume size from the disk size (capacity/100, 64..1024 MB); pin it so every machine
    # behaves alike. Volume files are sparse (no preallocation), so a fresh server takes MBs of disk, not GBs.
    volume_size_limit_mb: int = _flag("master.volumeSizeLimitMB", 1024)
    volume_preallocate: bool = _flag("master.volumePreallocate", False)
    # Every bucket is a collection that takes at least one volume of its own. mini's default cap (free disk /
    # volume size) can be ~10 on a CI disk, after which PutObject into a new bucket fails with InternalError.
    volume_max: int = _flag("volume.max", 1000)
    # The volume server waits this long after its last heartbeat before exiting; 0 lets SIGTERM finish fast.
    volume_pre_stop_s: int = _flag("volume.preStopSeconds", 0)
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        """The flags as ``weed mini`` arguments."""
        out = []
        for f in dataclasses.fields(self):
            if "flag" in f.metadata:
                value = getattr(self, f.name)
                out.append(f"-{f.metadata['flag']}={str(value).lower() if isinstance(value, bool) else value}")
        return [*out, *self.extra]
