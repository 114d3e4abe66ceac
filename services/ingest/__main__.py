"""``python -m services.ingest``: runs the ingest service."""

import sys

from services.ingest.service import main

sys.exit(main())
