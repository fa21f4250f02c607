"""`python -m primasim.loop.validate probe ...`: the in-device probe (run by `validate` inside each
emulated device)."""

import sys

from .driver import main

sys.exit(main())
