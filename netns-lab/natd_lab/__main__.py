"""python -m natd_lab: the natd-lab CLI."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
