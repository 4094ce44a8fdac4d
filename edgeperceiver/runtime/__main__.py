"""``python -m edgeperceiver.runtime BUNDLE INPUTS...`` (same as a bundle's ``run.py``)."""

import sys

from .command import main

sys.exit(main())
