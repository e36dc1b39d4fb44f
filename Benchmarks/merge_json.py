#!/usr/bin/env python3
"""Merges benchmark JSON files (each a list of objects, or one object) into one JSON list, in argument order.

    python3 Benchmarks/merge_json.py OUT.json IN.json [IN.json ...]

scripts/gpu-run uses it to turn the per-case `flashmoe bench --json` files into one flashmoe.json after every case,
so a run cut short still leaves every finished case. A missing, empty or malformed input is reported on standard
error and left out (a failed case must not lose the others); OUT is always written, as `[]` when nothing was
usable, and replaced atomically. Exit status: 0, or 2 when OUT cannot be written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_entries(path: str) -> tuple[list[dict], str | None]:
    """The objects in `path` and None, or [] and the reason the file was left out."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        return [], f"cannot read {path}: {e.strerror}"
    if not text.strip():
        return [], f"{path} is empty"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return [], f"{path} is not JSON: {e}"
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        return [], f"{path} holds neither a JSON object nor a list of objects"
    return data, None


def merge(paths: list[str], warn=lambda msg: print(msg, file=sys.stderr)) -> list[dict]:
    """Every usable entry of `paths`, in order; each file left out is passed to `warn`."""
    out: list[dict] = []
    for path in paths:
        entries, problem = read_entries(path)
        if problem:
            warn(f"merge_json: left out: {problem}")
        out += entries
    return out


def write_atomically(path: str, entries: list[dict]) -> None:
    """Writes `entries` as indented JSON through a temporary file and a rename (readers never see half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Merge benchmark JSON files into one JSON list.")
    p.add_argument("output", help="the merged file to write")
    p.add_argument("inputs", nargs="*", help="JSON files: lists of objects or single objects")
    args = p.parse_args(argv)
    entries = merge(args.inputs)
    try:
        write_atomically(args.output, entries)
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"merge_json: {len(entries)} entries from {len(args.inputs)} files into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
