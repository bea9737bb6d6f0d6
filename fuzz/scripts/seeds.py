#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/) and dictionaries (fuzz/dict/<target>.dict)
from the repository's sample events, playbooks, rules and the playbook sources in Rust tests.
Run from the repository root: python3 fuzz/scripts/seeds.py"""
import glob, hashlib, json, os, re

import yaml

ROOT = os.getcwd()
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


# normalize: every sample event, compact too, and each envelope's detail alone.
for p in sorted(glob.glob("events/*.json")):
    src = open(p).read()
    put("normalize", src)
    v = json.loads(src)
    put("normalize", json.dumps(v, separators=(",", ":")))
    if isinstance(v, dict) and "detail" in v:
        put("normalize", json.dumps(v["detail"]))
        for f in v["detail"].get("findings", [])[:1]:
            put("normalize", json.dumps(f))

# Playbook sources: the shipped ones and raw strings in Rust tests that look like playbooks.
playbooks = [open(p).read() for p in sorted(glob.glob("infra/playbooks/*.yaml"))]
rules = [open(p).read() for p in sorted(glob.glob("infra/rules/*.yaml"))]
for p in ["shared/core/src/playbook.rs", "tests/tests/playbooks.rs", "shared/core/src/engine/tests.rs"]:
    if not os.path.exists(p):
        continue
    for s in re.findall(r'r#"(.*?)"#', open(p).read(), re.S):
        if "\nsteps:" in s or s.startswith("steps:") or "\n  - id:" in s:
            playbooks.append(s)
for p in ["shared/core/src/rule.rs", "tests/tests/api.rs"]:
    if os.path.exists(p):
        for s in re.findall(r'r#"(.*?)"#', open(p).read(), re.S):
            if "trigger:" in s and "condition:" in s:
                rules.append(s)
for s in playbooks[:40]:
    put("playbook", s)
for s in rules:
    put("rule", s)

# Expressions: rule conditions and every ${{ }} in the playbooks; some with a JSON scope.
exprs = set()
for s in rules:
    try:
        c = yaml.safe_load(s).get("condition")
        if isinstance(c, str):
            exprs.add(c.strip())
    except Exception:
        pass
for s in playbooks:
    for e in re.findall(r"\$\{\{(.*?)\}\}", s):
        exprs.add(e.strip())
    for m in re.findall(r"^\s*(?:when|if|until|foreach|for_each|items|condition):\s*(.+)$", s, re.M):
        exprs.add(m.strip().strip('"').strip("'").replace("${{", "").replace("}}", "").strip())
exprs = sorted(e for e in exprs if e)
scope = json.dumps({"source": "guardduty", "severity": "High", "title": "t", "entities": {"remote_ips": ["198.51.100.7"], "users": ["u"]}, "n": 3, "l": [1, 2.5, "x", None, True]})
for i, e in enumerate(exprs):
    put("expr", e)
    if i % 3 == 0:
        put("expr", e.encode() + b"\0" + scope.encode())
put("expr", b'"a ${{ alert.title }} b"\0{"with": ["${{ alert.severity }}", {"k": "x ${{ 1 + 2 }}"}]}')

# Dictionaries.
def dict_file(target, words):
    os.makedirs(os.path.join(ROOT, "fuzz", "dict"), exist_ok=True)
    with open(os.path.join(ROOT, "fuzz", "dict", target + ".dict"), "w") as f:
        for w in sorted(set(words)):
            if 0 < len(w) <= 64:
                esc = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "".join("\\x%02X" % b for b in c.encode()) for c in w)
                f.write('"' + esc + '"\n')

def keys(v, out):
    if isinstance(v, dict):
        for k, c in v.items():
            out.add(str(k)); keys(c, out)
    elif isinstance(v, list):
        for c in v:
            keys(c, out)
    elif isinstance(v, str) and len(v) < 40:
        out.add(v)

ev = set()
for p in glob.glob("events/*.json"):
    keys(json.load(open(p)), ev)
dict_file("normalize", ['"' + k + '":' for k in ev] + list(ev) + ["null", "true", "false", "[]", "{}", "1e999", "-0", "::ffff:1.2.3.4"])

def yaml_words(srcs):
    out = set()
    for s in srcs:
        try:
            keys(yaml.safe_load(s), out)
        except Exception:
            pass
        out.update(re.findall(r"^\s*-?\s*([a-z_]+):", s, re.M))
    return [w + ":" for w in out] + list(out) + ["${{", "}}", "- ", "\n  ", "&a", "*a", "<<: ", "!!str", "|-", ">-", "~", "[]", "{}"]

dict_file("playbook", yaml_words(playbooks))
dict_file("rule", yaml_words(rules) + ["alert", "recommendation", "2030-01-01T00:00:00Z", "1999-12-31T23:59:60+14:00"])
cel = ["&&", "||", "!", "==", "!=", "<", "<=", ">", ">=", "in", "?", ":", "+", "-", "*", "/", "%", "size(", "has(", "int(", "uint(", "double(", "string(", "bytes(", "bool(", "type(", "dyn(", "timestamp(", "duration(", ".contains(", ".startsWith(", ".endsWith(", ".matches(", ".exists(", ".all(", ".exists_one(", ".map(", ".filter(", ".join(", ".split(", ".format(", ".lowerAscii()", ".upperAscii()", ".replace(", ".substring(", ".trim()", ".indexOf(", ".lastIndexOf(", ".charAt(", ".distinct()", ".flatten()", ".slice(", ".reverse()", ".sort()", "math.", "alert", "alert.entities", "steps", "vars", "input", "item", "index", "null", "true", "false", "b\"", "r\"", "'''", "\"\"\"", "\\u", "\\x", "0x", "1u", "1e308", "-9223372036854775808", "9223372036854775807", "18446744073709551615u", "${{", "}}", "[", "]", "{", "}"]
dict_file("expr", cel)

# A few hand-written rule shapes the shipped rules do not use.
for s in [
    "id: r1\nname: R\ntrigger: recommendation\norder: -3\nterminal: true\nenabled: false\ncondition: 'true'\nplaybooks: [p]\n",
    "id: r2\nname: R\ntrigger: alert\nexpires: '2030-01-01T00:00:00Z'\ncondition: alert.kind == 'alert' && alert.title.matches('^S.*')\nplaybooks: [p, q]\nupdated_by: me\nupdated_at: 1715000000000\n",
    '{"id":"r3","name":"R","trigger":"alert","condition":"alert.entities.remote_ips.exists(i, i.startsWith(\\"10.\\"))","playbooks":["p"],"order":9223372036854775807}',
]:
    put("rule", s)
