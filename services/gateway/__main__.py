"""``python -m services.gateway``: runs the gateway service."""

import sys

from services.gateway.service import main

sys.exit(main())
