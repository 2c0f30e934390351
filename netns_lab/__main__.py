"""Entry point of `python -m netns_lab`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
