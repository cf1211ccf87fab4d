"""``python -m analysis report|ui ...``."""

import sys

from analysis.commands import main

sys.exit(main())
