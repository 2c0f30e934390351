"""The key families under the etcd prefix and how a reader believes each one.

Node records are re-signed by their agent on every SVID rotation, so their signer's
chain must be valid now; workloads and policies are written once by a controller, so
their chain must have been valid when they were signed (tfcrypt.identity.verify.ChainTime).
"""

from __future__ import annotations

from collections.abc import Mapping

from tfcrypt.identity.verify import ChainTime
from tfcrypt.identity.view import Family
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy
from tfcrypt.model.workload import Workload

NODES, WORKLOADS, POLICIES = "nodes/", "workloads/", "policies/"


def families() -> Mapping[str, Family]:
    return {
        NODES: Family(NodeRecord.from_verified, ChainTime.NOW),
        WORKLOADS: Family(Workload.from_verified, ChainTime.ISSUED_AT),
        POLICIES: Family(EncryptionPolicy.from_verified, ChainTime.ISSUED_AT),
    }
