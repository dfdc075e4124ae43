#!/usr/bin/env python3
"""Expand a Slurm node list ("node[01-03,07],gpu-a1") into one hostname per line.

Used by slurm/common.sh where ``scontrol show hostnames`` is unavailable (dry runs on a laptop or
in CI). Standard library only: it runs before any environment is activated.
"""
from __future__ import annotations

import re
import sys


def _split_top(s: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    if cur:
        parts.append(cur)
    return parts


def expand(nodelist: str) -> list[str]:
    """``expand("node[01-02]") == ["node01", "node02"]``; zero padding kept, several ranges allowed."""
    hosts = []
    for part in _split_top(nodelist.strip()):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                for tail in expand(suffix) if "[" in suffix else [suffix]:
                    hosts.append(f"{prefix}{i:0{width}d}{tail}")
    return hosts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: hostlist.py NODELIST   (e.g. 'node[01-02]')")
    print("\n".join(expand(sys.argv[1])))
