#!/usr/bin/env python3
"""Compares kiln-load reports (JSON written by `kiln-load suite|merge --json`).

  bench_report.py compare NAME=REPORT NAME=REPORT [--json OUT]
      Side by side: every workload of the first report (the subject) next to the same workload
      of the second (the peer), with throughput and latency ratios subject / peer.
"""
import json
import sys


def figure(w):
    """The workload's headline figure: MB/s for ByteStream, items/s otherwise."""
    if w.get("bytes") and w["name"].startswith("bytestream"):
        return w.get("mb_per_sec"), "MB/s"
    return w.get("items_per_sec"), w.get("item_unit", "op") + "/s"


def compare(args):
    out = None
    if "--json" in args:
        i = args.index("--json")
        out = args[i + 1]
        args = args[:i] + args[i + 2:]
    (a_name, a_path), (b_name, b_path) = (x.split("=", 1) for x in args)
    a, b = json.load(open(a_path)), json.load(open(b_path))
    key = lambda w: (w["name"], w["concurrency"])
    peer = {key(w): w for w in b.get("workloads", [])}
    rows = []
    print()
    print(f"{a_name} vs {b_name}, same run, interleaved by workload (ratio = {a_name} / {b_name}; "
          f"for latency below 1 is better)")
    print(f'{"workload":<24} {"c":>3} {a_name:>16} {b_name:>16} {"x":>7}  '
          f'{"p50 ms":>15} {"x":>6}  {"p99 ms":>15} {"x":>6}')
    for w in a.get("workloads", []):
        p = peer.get(key(w))
        fa, unit = figure(w)
        row = {"name": w["name"], "concurrency": w["concurrency"], "unit": unit, a_name: fa}
        if not p or not p.get("latency") or not w.get("latency") or not figure(p)[0]:
            why = "failed or skipped on " + (b_name if w.get("latency") else a_name)
            print(f'{w["name"]:<24} {w["concurrency"]:>3} {fa or 0:>10.1f} {unit:<5}  {why}')
            row[b_name] = None
            rows.append(row)
            continue
        fb = figure(p)[0]
        la, lb = w["latency"], p["latency"]
        row.update({
            b_name: fb,
            "throughput_ratio": fa / fb,
            "p50_ms": {a_name: la["p50_ms"], b_name: lb["p50_ms"]},
            "p99_ms": {a_name: la["p99_ms"], b_name: lb["p99_ms"]},
        })
        rows.append(row)
        print(f'{w["name"]:<24} {w["concurrency"]:>3} {fa:>10.1f} {unit:<5} {fb:>10.1f} {unit:<5} {fa / fb:>7.2f}  '
              f'{la["p50_ms"]:>7.2f}/{lb["p50_ms"]:<7.2f} {la["p50_ms"] / max(lb["p50_ms"], 1e-9):>6.2f}  '
              f'{la["p99_ms"]:>7.2f}/{lb["p99_ms"]:<7.2f} {la["p99_ms"] / max(lb["p99_ms"], 1e-9):>6.2f}')
        for name, r in ((a_name, w), (b_name, p)):
            if r.get("error"):
                row.setdefault("errors", {})[name] = r["error"]
                print(f'{"":<28}{name}: {r["error"]}')
    for s in b.get("skipped", []):
        print(f"{b_name} skipped {s.get('name')}: {s.get('reason')}")
    if out:
        json.dump({"subject": a_name, "peer": b_name, "rows": rows}, open(out, "w"), indent=2)


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "compare":
        compare(sys.argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
