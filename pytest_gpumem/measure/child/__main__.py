"""``python -m pytest_gpumem.measure.child REQUEST.json RESULT.json``: run the request, write the result, exit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .distributed import isolate_gpu, rank_of, result_path_for
from .process import Child  # imports no torch at its top: isolate_gpu still runs before torch


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m pytest_gpumem.measure.child REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request_path, result_path = Path(argv[0]), Path(argv[1])
    request = json.loads(request_path.read_text(encoding="utf-8"))
    isolate_gpu(request)  # before torch is imported
    result = Child(request).execute()
    _write_json(result_path_for(request, result_path), result)
    # skip interpreter teardown of CUDA/vLLM state: the result is written, a slow or crashing exit is noise
    sys.stdout.flush()
    sys.stderr.flush()
    # one rank of several: a failed rank exits non-zero so that the launcher stops the others (which would
    # wait for it in a collective)
    os._exit(1 if rank_of(request) is not None and result.get("status") != "ok" else 0)


if __name__ == "__main__":
    sys.exit(main())
