"""``gpumem models``: the built-in registry."""

from __future__ import annotations

import argparse
import json
import sys

from ..models import registry, registry_record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    rows = []
    for name, spec in registry().items():
        record = registry_record(name)
        data = spec.to_dict()
        data["aliases"] = record.get("aliases", [])
        data["published_num_params"] = record.get("published_total_params")
        rows.append(data)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'model':45s} {'params':>8s} {'type':12s} {'layers':>6s} {'hidden':>6s} {'vocab':>7s} {'heads/kv':>8s}")
    for row in rows:
        print(f"{row['name']:45s} {row['num_params'] / 1e9:7.2f}B {row['model_type']:12s} "
              f"{row['num_hidden_layers']:6d} {row['hidden_size']:6d} {row['vocab_size']:7d} "
              f"{row['num_attention_heads']:>4d}/{row['num_key_value_heads']:<3d}")
    return 0
