"""What the registry raises, and the one place where aetcd/gRPC errors are translated.

Rules:
- Nothing above this package sees an aetcd or grpc exception: every call into aetcd runs
  inside `etcd_errors(op)`, which maps it to a `RegistryError`.
- `RegistryUnavailable` means "try again, maybe on another member": connection refused,
  timeouts, no leader, a broken stream. `Compacted` and `LeaseLost` are kinds of it that
  callers handle specially (relist; grant a new lease); anyone who does not care catches
  the base class.
- `RegistryRequestRejected` is etcd refusing the request itself (bad key, value too
  large, permission): retrying the same request cannot help.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aetcd
import grpc

from tfcrypt.errors import TfcryptError


class RegistryError(TfcryptError):
    """Base of the registry's errors."""


class RegistryUnavailable(RegistryError):
    """etcd could not be reached or could not serve the request now."""


class Compacted(RegistryUnavailable):
    """The watch asked for history that etcd has compacted away: relist."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted below {compacted_revision}")
        self.compacted_revision = compacted_revision


class LeaseLost(RegistryUnavailable):
    """The lease no longer exists in etcd (expired or revoked): grant a new one."""


class RegistryRequestRejected(RegistryError):
    """etcd refused the request itself; retrying it unchanged will not help."""


class BadKey(RegistryRequestRejected, ValueError):
    """A relative key that cannot name an etcd key: empty, a leading "/", or a bad escape
    in the printable form (tfcrypt.text). Refused before any request is sent."""


_REJECTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


def _status_code(exc: BaseException) -> grpc.StatusCode | None:
    cause = exc if isinstance(exc, grpc.aio.AioRpcError) else exc.__cause__
    return cause.code() if isinstance(cause, grpc.aio.AioRpcError) else None


@contextlib.contextmanager
def etcd_errors(op: str) -> Iterator[None]:
    """Run one etcd operation named `op`; re-raise its failure as a `RegistryError`."""
    try:
        yield
    except aetcd.RevisionCompactedError as exc:
        raise Compacted(exc.compacted_revision) from exc
    except (aetcd.ClientError, grpc.aio.AioRpcError) as exc:
        code = _status_code(exc)
        detail = f"{op}: {exc}"
        if code is grpc.StatusCode.NOT_FOUND and "lease not found" in str(exc):
            raise LeaseLost(detail) from exc
        if code in _REJECTED_CODES:
            raise RegistryRequestRejected(detail) from exc
        raise RegistryUnavailable(detail) from exc
    except (TimeoutError, OSError, grpc.aio.BaseError) as exc:
        raise RegistryUnavailable(f"{op}: {type(exc).__name__}: {exc}") from exc
