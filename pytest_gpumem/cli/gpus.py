"""``gpumem gpus``: the cards a ``--gpu`` / ``gpu=`` name resolves to, with the memory torch reports on each."""

from __future__ import annotations

import argparse
import json

from ..gpus import known_gpus
from ..report.text import columns
from ..units import format_gib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (card, total_bytes, source, names)")


def run(args: argparse.Namespace) -> int:
    cards: dict[str, dict] = {}
    for alias, gpu in known_gpus().items():
        entry = cards.setdefault(gpu.name, {"card": gpu.name, "total_bytes": gpu.total_bytes, "source": gpu.source,
                                            "names": []})
        entry["names"].append(alias)
    ordered = sorted(cards.values(), key=lambda entry: (entry["total_bytes"], entry["card"]))
    if args.json:
        print(json.dumps(ordered, indent=2))
        return 0
    rows = [["card", "memory", "type any of"]]
    for entry in ordered:
        source = "" if entry["source"] == "torch" else f" ({entry['source']})"
        rows.append([entry["card"], format_gib(entry["total_bytes"]) + source, ", ".join(entry["names"])])
    print("\n".join(columns(rows, right=lambda column: column == 1)))
    print("memory: the total torch reports on the card; names are case- and punctuation-insensitive "
          "(A100-80GB = a100 80gb); the card name itself works too; or give a size: --gpu 24GiB")
    return 0
