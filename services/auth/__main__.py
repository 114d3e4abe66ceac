"""``python -m services.auth``: runs the auth service."""

import sys

from services.auth.service import main

sys.exit(main())
