"""``python -m services.rag``: runs the rag service."""

import sys

from services.rag.service import main

sys.exit(main())
