"""``python -m services.chat``: runs the chat service."""

import sys

from services.chat.service import main

sys.exit(main())
