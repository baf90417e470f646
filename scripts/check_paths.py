#!/usr/bin/env python3
"""Fails when a tracked file names a path outside the repository.

A user's clone has nothing beside it, so code, tests, scripts and docs may only refer to
files inside the repository. A relative path climbs out when its `../` steps go above
the repository root, counted from the folder it is resolved against: the file's own
folder, or its crate's folder (the nearest `Cargo.toml` above it: `env!("CARGO_MANIFEST_DIR")`
and `cargo run` resolve against that), whichever is higher up; and any `../shared` (the folder CI keeps beside its clone) is
refused wherever it is. Absolute paths into the
workspace that holds the clone (`/work/...`) are refused too. A line that holds such a
path on purpose (a hostile input in a test) says `check_paths: allow`.

Usage: python3 scripts/check_paths.py   (from anywhere inside the repository)
"""
import os
import re
import subprocess
import sys

CLIMB = re.compile(r"((?:\.\./)+)([A-Za-z0-9_][A-Za-z0-9_.\-/]*)?")
ABSOLUTE = re.compile(r"/work/[A-Za-z0-9_.\-]+")


def main() -> int:
    root = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
    ).stdout.strip()
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.decode().split("\0")
    crates = {os.path.dirname(f) for f in files if os.path.basename(f) == "Cargo.toml"}

    def depth(folder: str) -> int:
        return 0 if folder == "" else folder.count("/") + 1

    def crate_of(folder: str) -> str:
        while folder and folder not in crates:
            folder = os.path.dirname(folder)
        return folder

    bad = []
    for f in files:
        if not f or f == "Cargo.lock" or f == "scripts/check_paths.py":
            continue
        path = os.path.join(root, f)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        folder = os.path.dirname(f)
        room = depth(folder)
        if f.endswith(".rs"):
            room = min(room, depth(crate_of(folder)))
        for n, line in enumerate(text.splitlines(), 1):
            if "check_paths: allow" in line:
                continue
            for m in CLIMB.finditer(line):
                steps = m.group(1).count("../")
                beside = (m.group(2) or "").split("/")[0] == "shared"
                if steps > room or beside:
                    bad.append(f"{f}:{n}: `{m.group(0)}` climbs out of the repository")
            for m in ABSOLUTE.finditer(line):
                bad.append(f"{f}:{n}: `{m.group(0)}` is a path outside the repository")
    for b in bad:
        print(b, file=sys.stderr)
    if bad:
        print(
            f"{len(bad)} reference(s) to paths outside the repository: a clone has nothing "
            "beside it; bring what is needed into the repository",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
