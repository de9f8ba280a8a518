"""The chaos lane's results table (build/chaos/results.md, docs/reliability.md)."""

from __future__ import annotations

from collections import Counter

from .runner import Record


def markdown_table(seed: str, records: list[Record]) -> str:
    lines = [f"Seed `{seed}`, {len(records)} runs, {sum(r.seconds for r in records) / 60:.0f} min of runs.", "",
             "| run | faults (in order) | expected | outcome | links lost | time |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        outcome = r.outcome + (f": {r.detail}" if r.detail else "")
        lost = r.pull.get("reconnects", "")  # the last pull's count: a restarted pull counts from 0
        lines.append(f"| {r.index} | {'; '.join(r.faults)} | {r.expect} | {outcome} | {lost} | {r.seconds:.0f} s |")
    tally = Counter(r.outcome for r in records)
    lines += ["", "Outcomes: " + ", ".join(f"{n} {o}" for o, n in tally.most_common()) + "."]
    return "\n".join(lines) + "\n"
