"""The results tables of bench/README.md, from every bench/results/*.json (oldest first per script): keep in
results/ the runs the README should show, e.g. the same script at two client counts.

    .venv/bin/python bench/report.py            # print the Markdown
    .venv/bin/python bench/report.py --write    # replace the block between the markers in bench/README.md

Every ratio is quoted from the run that measured both of its sides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT

README = ROOT / "bench" / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def runs(name: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, json.loads(path.read_text())) for path in sorted(RESULTS.glob(f"{name}-*.json"))]


def num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def run_line(path: Path, doc: dict[str, Any]) -> str:
    m, git = doc["machine"], doc["git"]
    outside = [f for f in git.get("changed", []) if not f.startswith("bench/")]
    dirty = f" with uncommitted changes to {', '.join(f'`{f}`' for f in outside)}" if outside else ""
    return (
        f"`{path.relative_to(ROOT)}`: commit `{git['commit']}`{dirty}; {m['nproc']} cores, PostgreSQL"
        f" {str(m['server_version']).split()[0]}, synchronous_commit={m['synchronous_commit']}, fsync={m['fsync']},"
        f" shared_buffers={m['shared_buffers']}; {num(m.get('busy_cores_before'), 2)} cores busy before the run."
    )


def cpu_of(r: dict[str, Any], kind: str) -> str:
    """CPU ms per transaction of one kind of a pgbench result (absent from older results)."""
    return num(r.get("cpu_ms_per_tx", {}).get(kind), 2)


def pgbench_row(label: str, r: dict[str, Any] | None) -> str:
    if r is None:
        return f"| {label} | - | - | - | - | - |"
    return (
        f"| {label} | {num(r['tps'])} | {num(r['latency_ms'], 2)} | {r['clients']} | {cpu_of(r, 'postgres')}"
        f" | {cpu_of(r, 'machine')} |"
    )


def baseline_section(path: Path, doc: dict[str, Any]) -> list[str]:
    f, p = doc["figures"], doc["parameters"]
    lines = [
        f"### Baselines (`bench/baseline.py`, {p['clients']} clients, {p['seconds']} s each)",
        "",
        run_line(path, doc),
        "",
        "| workload | tps | mean latency ms | clients | CPU ms/tx: PostgreSQL | whole machine |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        pgbench_row(f"pgbench tpcb-like, read committed, scale {p['scale']}", f["tpcb_like"]),
        pgbench_row(f"plain-SQL post_transfer, uniform over {p['accounts']:,} accounts", f["plain_sql"]["uniform"]),
        pgbench_row("plain-SQL post_transfer, hot (all into one account)", f["plain_sql"]["hot"]),
        "",
    ]
    lines += [f"- {name}: **{value:.2f}**" for name, value in doc["ratios"].items()]
    return [*lines, ""]


def engine_section(path: Path, doc: dict[str, Any]) -> list[str]:
    f, p = doc["figures"], doc["parameters"]
    plain = f["plain_sql"]
    lines = [
        f"### Engine without HTTP or queue (`bench/postings.py`, {p['clients']} threads, {p['seconds']} s per case,"
        f" {p['accounts']:,} accounts; {p['engine_mode']})",
        "",
        run_line(path, doc),
        "",
        "| case | postings/s | retries | CPU ms/posting: bench process (pgbench) | PostgreSQL | whole machine |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, r in f["engine"].items():
        cpu = r["cpu_ms_per_posting"]
        lines.append(
            f"| engine {case} | {num(r['rate'])} | {r['retries']} | {num(cpu['self'], 2)} | {num(cpu['postgres'], 2)}"
            f" | {num(cpu['machine'], 2)} |"
        )
    baselines = [("plain-SQL uniform", plain["uniform"]), ("plain-SQL hot", plain["hot"])]
    if f.get("tpcb_like"):
        baselines.append((f"pgbench tpcb-like, scale {p['tpcb_scale']}", f["tpcb_like"]))
    for label, r in baselines:
        lines.append(
            f"| {label} (same run) | {num(r['tps'])} | {r['retried']} | {cpu_of(r, 'pgbench')}"
            f" | {cpu_of(r, 'postgres')} | {cpu_of(r, 'machine')} |"
        )
    lines.append("")
    lines += [f"- {name}: **{value:.2f}**" for name, value in doc["ratios"].items()]
    return [*lines, ""]


def e2e_section(path: Path, doc: dict[str, Any]) -> list[str]:
    f, p = doc["figures"], doc["parameters"]
    plain = f["plain_sql"]
    kinds = ["ingress", "worker", "relay", "nginx", "postgres", "rabbitmq", "redis", "loadgen", "machine"]
    lines = [
        f"### End to end through nginx (`bench/e2e.py`, {p['in_flight']} requests in flight, {p['seconds']} s per"
        f" phase, {p['accounts']:,} accounts)",
        "",
        run_line(path, doc),
        f"Checks: accepted == settled with nothing pending in every phase, and `cleanledger verify` exit"
        f" {doc['checks'].get('verify_exit_code')}: **{'passed' if doc['checks'].get('ok') else 'FAILED'}**.",
        "",
        "| case / mode | accepted/s | settled/s | POST p50 / p99 ms | accept-to-settled p50 / p99 ms | not 2xx |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for ph in f["phases"]:
        post, settle = ph["post_latency_ms"], ph["accept_to_settled_ms"]
        not_2xx = ", ".join(f"{s}: {n}" for s, n in ph["not_2xx"].items()) or "none"
        lines.append(
            f"| {ph['case']} / {ph['mode']} | {num(ph['accepted_per_s'])} | {num(ph['settled_per_s'])}"
            f" | {num(post['p50'])} / {num(post['p99'])} | {num(settle['p50'])} / {num(settle['p99'])} | {not_2xx} |"
        )
    if plain:
        lines += [
            "",
            f"Plain-SQL baseline in the same run, {p['in_flight']} pgbench clients: uniform"
            f" {num(plain['uniform']['tps'])} tps ({cpu_of(plain['uniform'], 'machine')} CPU ms/tx on the machine),"
            f" hot {num(plain['hot']['tps'])} tps ({cpu_of(plain['hot'], 'machine')} CPU ms/tx).",
        ]
    lines += [
        "",
        "CPU milliseconds per settled operation (from /proc, load and drain of the phase):",
        "",
        "| case / mode | " + " | ".join(kinds) + " |",
        "| --- |" + " ---: |" * len(kinds),
    ]
    for ph in f["phases"]:
        cpu = ph["cpu_ms_per_settled"]
        lines.append(f"| {ph['case']} / {ph['mode']} | " + " | ".join(num(cpu.get(k), 2) for k in kinds) + " |")
    lines.append("")
    lines += [f"- {name}: **{value:.3f}**" for name, value in doc["ratios"].items()]
    return [*lines, ""]


def render() -> str:
    lines: list[str] = []
    for name, section in (("postings", engine_section), ("e2e", e2e_section), ("baseline", baseline_section)):
        for found in runs(name):
            lines += section(*found)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"update {README.relative_to(ROOT)} in place")
    args = parser.parse_args()
    text = render()
    if not args.write:
        print(text, end="")
        return
    readme = README.read_text()
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    print(f"updated {README.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
