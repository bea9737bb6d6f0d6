#!/usr/bin/env python3
"""Caps a corpus directory at N files: greedy set cover of the edges (COV lines) in a libFuzzer
merge control file, most new edges first. Usage: cap.py CONTROL_FILE DIR N"""
import os, sys

control, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(control).read().split("\n")
nfiles = int(lines[0])
files = lines[2:2 + nfiles]
cov = {}
for l in lines[2 + nfiles:]:
    p = l.split()
    if len(p) >= 2 and p[0] == "COV":
        cov[int(p[1])] = set(p[2:])
have, keep = set(), []
while len(keep) < n:
    best = max(cov, key=lambda i: len(cov[i] - have), default=None)
    if best is None or not cov[best] - have:
        break
    have |= cov.pop(best)
    keep.append(files[best])
keep = set(os.path.basename(f) for f in keep)
dropped = 0
for f in os.listdir(d):
    if f not in keep:
        os.remove(os.path.join(d, f)); dropped += 1
print(f"kept {len(keep)} files covering {len(have)} edges; dropped {dropped}")
