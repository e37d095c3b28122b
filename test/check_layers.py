#!/usr/bin/python3
"""Layer check: every module of the daemon includes only headers of its own
layer or a layer below (docs/architecture.md, "Map"), and the modules'
include graph has no cycle. Exit 1 with the offending includes otherwise.

    /usr/bin/python3 test/check_layers.py [SRC]

Layers, bottom up (a folder is one layer; files directly in coordinator/ are
the daemon's shell, the top):
  0  proto/ (wire protocol, gid codec), coordinator/base/ (no paycoord deps)
  1  coordinator/core/    configuration, daemon context, requests, gid owners
  2  coordinator/db/      the store (all SQL) and the pool
     coordinator/processor/  the processor adapters and HTTP client
  3  recovery/            recovery, node lock, admin ops
  4  coordinator/pay/     the payment path
  5  coordinator/*.c      server, ops, stats, metrics, access, notify, main
  -  coordinator/ctl/     paycoordctl: may use layer 0 only
Folders of one layer do not include each other (db/ and processor/ know
nothing of each other). Allowed exceptions are listed in ALLOWED.
"""

import os
import re
import sys

LAYERS = {
    "proto": 0,
    "coordinator/base": 0,
    "coordinator/core": 1,
    "coordinator/db": 2,
    "coordinator/processor": 2,
    "recovery": 3,
    "coordinator/pay": 4,
    "coordinator": 5,
}
CTL = "coordinator/ctl"
ALLOWED = set()          # (from_file, header) pairs that may break the rule; none today

INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def folder_of(rel):
    return os.path.dirname(rel)


def main():
    src = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
    files = {}
    for top in ("proto", "coordinator", "recovery"):
        for root, _, names in os.walk(os.path.join(src, top)):
            for n in names:
                if n.endswith((".c", ".h")):
                    rel = os.path.relpath(os.path.join(root, n), src)
                    files[rel] = open(os.path.join(src, rel), encoding="utf-8").read()
    headers = {}
    for rel in files:
        if rel.endswith(".h"):
            name = os.path.basename(rel)
            if name in headers:
                print(f"layers: header name {name} is not unique: {headers[name]} and {rel}")
                return 1
            headers[name] = rel
    problems = []
    edges = {}
    for rel, text in sorted(files.items()):
        here = folder_of(rel)
        if here not in LAYERS and here != CTL:
            problems.append(f"{rel}: folder {here} has no layer (add it to LAYERS in test/check_layers.py)")
            continue
        mod = os.path.splitext(rel)[0]
        for inc in INCLUDE.findall(text):
            target = headers.get(os.path.basename(inc))
            if not target:
                continue                     # a system or library header
            there = folder_of(target)
            tmod = os.path.splitext(target)[0]
            if tmod != mod:
                edges.setdefault(mod, set()).add(tmod)
            if (rel, os.path.basename(inc)) in ALLOWED:
                continue
            if here == CTL:
                if LAYERS.get(there, 99) != 0 and there != CTL:
                    problems.append(f"{rel} includes {target}: paycoordctl may use layer 0 only")
                continue
            lf, lt = LAYERS[here], LAYERS.get(there, 99)
            if lt > lf:
                problems.append(f"{rel} (layer {lf}) includes {target} (layer {lt}): calls must go downward")
            elif lt == lf and there != here and lf != 0:
                problems.append(f"{rel} includes {target}: {here} and {there} are siblings of layer {lf}")
    # Cycles among modules (a .c and its .h are one module).
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            strong(v)
    for comp in sccs:
        problems.append("include cycle: " + " -> ".join(comp))
    nmods = len({os.path.splitext(r)[0] for r in files})
    if problems:
        print("\n".join(f"layers: {p}" for p in problems))
        print(f"layers: FAILED ({len(problems)} problems in {nmods} modules)")
        return 1
    print(f"layers: {nmods} modules, {sum(len(v) for v in edges.values())} include edges, "
          "every one downward or within a folder, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
