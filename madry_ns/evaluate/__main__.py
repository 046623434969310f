"""`python -m madry_ns.evaluate ...`: see `madry_ns.evaluate`."""

import sys

from madry_ns.evaluate.cli import main

sys.exit(main())
