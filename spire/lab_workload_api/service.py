"""The SpiffeWorkloadAPI servicer for one socket (X.509 profile only).

Rules (SPIFFE Workload Endpoint and Workload API specs, as spire-agent behaves):
- every call must carry metadata `workload.spiffe.io: true`, else InvalidArgument; this
  is checked before anything else, on every method, including the unimplemented ones;
- the caller is whoever connects to this socket: the socket *is* the attestation
  (Python gRPC cannot read SO_PEERCRED); a socket without a registered identity answers
  FetchX509SVID and FetchX509Bundles with PermissionDenied, like spire-agent for an
  unregistered workload (its default `allow_unauthenticated_verifiers = false`);
- FetchX509SVID and FetchX509Bundles are long-lived streams: the first message goes out
  at once, a complete new message follows every change, and the server never ends the
  stream on its own (py-spiffe treats a normal end as an error or reconnects); the stream
  ends only when the client goes away or the server shuts down;
- bundles are keyed by the trust domain's SPIFFE ID (`spiffe://<td>`), as spire-agent does;
  CRLs and federated bundles are left empty;
- JWT-SVID methods answer Unimplemented.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

from lab_workload_api.ca import IssuedSVID
from lab_workload_api.identities import IdentitySource
from lab_workload_api.versioned import Versioned

log = logging.getLogger("lab_workload_api")

WORKLOAD_HEADER = "workload.spiffe.io"
WORKLOAD_HEADER_VALUE = "true"


class WorkloadAPIService(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """Serves one socket's identity (or none) and the trust domain's bundle."""

    def __init__(self, socket: Path, identity: IdentitySource | None,
                 bundle: Versioned[bytes], trust_domain: str) -> None:
        self._socket = socket
        self._identity = identity
        self._bundle = bundle
        self._trust_domain_id = f"spiffe://{trust_domain}"

    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        await _require_workload_header(context)
        identity = await self._require_identity(context, "FetchX509SVID")
        log.info("stream opened method=FetchX509SVID socket=%s spiffe_id=%s",
                 self._socket, identity.spiffe_id)
        version = 0
        try:
            while (update := await identity.svid.next_after(version)) is not None:
                version, svid = update
                yield self._svid_response(svid)
        finally:
            log.info("stream closed method=FetchX509SVID socket=%s", self._socket)

    async def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        await _require_workload_header(context)
        await self._require_identity(context, "FetchX509Bundles")
        log.info("stream opened method=FetchX509Bundles socket=%s", self._socket)
        version = 0
        try:
            while (update := await self._bundle.next_after(version)) is not None:
                version, bundle_der = update
                yield workload_pb2.X509BundlesResponse(
                    bundles={self._trust_domain_id: bundle_der})
        finally:
            log.info("stream closed method=FetchX509Bundles socket=%s", self._socket)

    async def FetchJWTSVID(self, request: workload_pb2.JWTSVIDRequest,
                           context: grpc.aio.ServicerContext) -> workload_pb2.JWTSVIDResponse:
        await _unimplemented(context)

    async def FetchJWTBundles(self, request: workload_pb2.JWTBundlesRequest,
                              context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context)

    async def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext,
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await _unimplemented(context)

    async def _require_identity(self, context: grpc.aio.ServicerContext,
                                method: str) -> IdentitySource:
        if self._identity is None:
            log.info("denied method=%s socket=%s reason=no-identity", method, self._socket)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "no identity issued: this socket has no registered SPIFFE ID")
        return self._identity

    def _svid_response(self, svid: IssuedSVID) -> workload_pb2.X509SVIDResponse:
        return workload_pb2.X509SVIDResponse(svids=[workload_pb2.X509SVID(
            spiffe_id=svid.spiffe_id,
            x509_svid=svid.chain_der(),
            x509_svid_key=svid.key_der(),
            bundle=self._bundle.value,
        )])


async def _require_workload_header(context: grpc.aio.ServicerContext) -> None:
    metadata = context.invocation_metadata() or ()
    if not any(key == WORKLOAD_HEADER and value == WORKLOAD_HEADER_VALUE
               for key, value in metadata):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"security header missing from request: {WORKLOAD_HEADER}")


async def _unimplemented(context: grpc.aio.ServicerContext) -> NoReturn:
    await _require_workload_header(context)
    await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                        "the lab Workload API serves the X.509-SVID profile only")
