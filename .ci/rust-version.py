#!/usr/bin/env python3
"""The workspace's declared rust-version must be at least every locked dependency's: a user
building with the declared toolchain must not meet a dependency that refuses it."""
import json
import subprocess
import sys


def version(v):
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


meta = json.loads(
    subprocess.check_output(["cargo", "metadata", "--format-version", "1", "--locked"])
)
members = set(meta["workspace_members"])
ours = {p["rust_version"] for p in meta["packages"] if p["id"] in members}
if len(ours) != 1 or None in ours:
    sys.exit(f"every workspace member declares the workspace's rust-version: {ours}")
declared = ours.pop()
needs = [
    (p["rust_version"], p["name"], p["version"])
    for p in meta["packages"]
    if p["id"] not in members and p.get("rust_version")
]
worst = max(needs, key=lambda t: version(t[0]))
if version(worst[0]) > version(declared):
    sys.exit(
        f"rust-version {declared} is below what {worst[1]} {worst[2]} needs ({worst[0]}): raise it"
    )
print(f"rust-version {declared}: every locked dependency builds with it (highest: {worst[1]} {worst[2]}, {worst[0]})")
