"""Command line ``lalora-curv`` (``python -m lalora_curv``): fit, train, eval, inspect, quickstart.

See :mod:`lalora_curv.cli` and docs/cli.md.
"""

from __future__ import annotations

import logging
import os
import sys

from lalora_curv.errors import LaloraError


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; a wrong input exits with status 1 and one ``error:`` line naming it.

    Set ``LALORA_CURV_DEBUG=1`` for the traceback instead.
    """
    from lalora_curv.cli import run_command

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_command(sys.argv[1:] if argv is None else list(argv))
    except (LaloraError, OSError) as e:
        if os.environ.get("LALORA_CURV_DEBUG"):
            raise
        print(f"lalora-curv: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
