"""Keeping the Hugging Face libraries from ever reaching for the network."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def offline() -> None:
    """Call before the first import of transformers in this process.

    The hub client reads ``HF_HUB_OFFLINE`` when it is imported; every load
    also passes ``local_files_only=True``, a second lock on the same door.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Progress bars are for terminals; in a service log they are noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
