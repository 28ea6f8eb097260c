"""`qwen-tui`: the terminal UI. Not built yet; see the README's roadmap."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("qwen-tui: the terminal UI is not built yet (it needs the training daemon); "
          "see the Roadmap section of README.md.", file=sys.stderr)
    return 2
