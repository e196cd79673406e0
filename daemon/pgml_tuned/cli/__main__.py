"""`python -m pgml_tuned.cli ...`: the same as the `pgml-tuned` command."""

from __future__ import annotations

import sys

from .app import main

sys.exit(main())
