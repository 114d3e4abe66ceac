"""``python -m devstack``: the embedded stack, as ``make run`` starts it."""

import sys

from devstack.run import main

sys.exit(main())
