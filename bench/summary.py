"""Turns a bench/run.sh result folder into one Markdown table per workload,
with each server's figures and their ratio to the first server's."""

import json
import pathlib
import sys

WORKLOADS = [
    # (workload, headline field, unit, heading)
    ("bulk", "users_per_s", "users/s", "bulk: BulkAddUsers, 4 streams"),
    ("list", "users_per_s", "users/s", "list: ListUsers full scans, 1 client"),
    ("add", "calls_per_s", "calls/s", "add: AddUser, 64 workers, closed loop"),
    ("get", "calls_per_s", "calls/s", "get: GetUser, 64 workers, closed loop"),
    ("sync", "calls_per_s", "Acks/s", "sync: SyncUsers upserts, window 64, 8 watchers"),
]


def main(folder):
    folder = pathlib.Path(folder)
    servers = []
    for path in sorted(folder.glob("*.bulk.json"), key=lambda p: p.stat().st_mtime):
        servers.append(path.name.split(".")[0])
    for workload, field, unit, heading in WORKLOADS:
        rows = []
        for server in servers:
            path = folder / f"{server}.{workload}.json"
            if path.exists():
                rows.append((server, json.loads(path.read_text())))
        if not rows:
            continue
        print(f"### {heading}\n")
        print(f"| server | {unit} | ratio | MB/s | p50 ms | p99 ms | p99.9 ms | max ms | statuses | generator cores |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
        base = rows[0][1][field] or 1
        for server, r in rows:
            lat = r["latency"] or {}
            codes = ", ".join(f"{c} {n}" for c, n in r["codes"].items())
            print(
                f"| {server} | {r[field]:,.0f} | {r[field] / base:.2f} | {r['mb_per_s']:.1f} "
                f"| {lat.get('p50_ms', 0):.2f} | {lat.get('p99_ms', 0):.2f} | {lat.get('p999_ms', 0):.2f} "
                f"| {lat.get('max_ms', 0):.2f} | {codes} | {r['generator_cores']:.2f} |"
            )
        if workload == "sync":
            print()
            for server, r in rows:
                p = r.get("propagation")
                if p:
                    print(
                        f"- {server}: Change to 8 watchers p50 {p['p50_ms']:.2f} ms, "
                        f"p99 {p['p99_ms']:.2f} ms, max {p['max_ms']:.2f} ms ({p['count']:,} deliveries)"
                    )
        if workload == "bulk":
            print()
            for server in servers:
                path = folder / f"{server}.rss.json"
                if path.exists():
                    bulk = json.loads((folder / f"{server}.bulk.json").read_text())
                    print(
                        f"- {server}: {bulk['rows_added']:,} users imported, "
                        f"RSS after the import: {json.loads(path.read_text())['rss_mib']} MiB"
                    )
        print()


if __name__ == "__main__":
    main(sys.argv[1])
