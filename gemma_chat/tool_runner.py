"""Run one tool call in this (child) process: ``python -m gemma_chat.tool_runner FILE NAME``
with the arguments as JSON on stdin. The function's own output goes to stderr; the last line
of stdout is ``{"result": ...}`` or ``{"error": "Kind: message"}``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    path, name = Path(sys.argv[1]), sys.argv[2]
    out = sys.stdout
    sys.stdout = sys.stderr  # what the tool prints is not its result
    try:
        from gemma_chat.local_tools import import_file

        arguments = json.loads(sys.stdin.read() or "{}")
        result = getattr(import_file(path), name)(**arguments)
        try:
            line = json.dumps({"result": result}, ensure_ascii=False)
        except (TypeError, ValueError):
            line = json.dumps({"result": str(result)}, ensure_ascii=False)
    except Exception as exc:  # noqa: BLE001 - the tool's own failure, reported to the model
        line = json.dumps({"error": f"{type(exc).__name__}: {exc}"}, ensure_ascii=False)
    out.write(line + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
