"""The lab's one error type.

Rules: every failure the operator can fix is a `LabError` whose message is one line that
names the problem and the fix; the CLI prints it as `netns_lab: <message>` and exits 1.
"""

from __future__ import annotations


class LabError(Exception):
    """A lab failure with a one-line, actionable message."""
