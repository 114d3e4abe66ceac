"""Writes Envoy's configuration: ``python -m services.edge --out envoy/envoy.yaml``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from services.edge.config import EdgeSettings, render
from services.runtime.config import ConfigError

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="YAML file to write")
    parser.add_argument(
        "--descriptor",
        type=Path,
        default=Path("envoy/janna.pb"),
        help="descriptor set from protos/build.py (default: envoy/janna.pb)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        settings = EdgeSettings.from_env(args.descriptor)
        text = render(settings)
    except (ConfigError, OSError) as exc:
        logger.error("cannot generate the edge config: %s", exc)
        return 1

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    logger.info("edge: wrote %s (listening on port %d)", args.out, settings.listen_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
