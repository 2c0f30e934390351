"""The pure core: snapshots of verified inputs in, desired dataplane state out.

Nothing in this package does I/O, reads a clock or imports asyncio, pyroute2 or
subprocess; tests/test_core_purity.py fails if it does.
"""
