"""`PYTHONPATH=tests python -m fuzz`: the campaign (see campaign.py)."""

import sys

from .campaign import main

sys.exit(main())
