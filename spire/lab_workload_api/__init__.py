"""The lab's SPIFFE Workload API server: a stand-in for spire-agent.

SPIRE binaries cannot be installed on the lab machines, so this package mints real
X509-SVIDs from a lab CA and serves them over the real Workload API (the proto that
py-spiffe ships), one Unix socket per registered identity.
"""
