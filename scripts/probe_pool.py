"""The probe's comparisons pooled over several runs and probes (e.g. a probe sweep's seeds).

    .venv/bin/python scripts/probe_pool.py sweeps/probe-controls/base/seed-*/ --out sweeps/probe-controls/pooled.json

One probe of one run holds few correct trajectories on a small model (each training probe warns under
20 per compared group). This reads every RUN_DIR/probe/probe.jsonl given and computes the same
comparisons as each probe does (distributed/lens/probe_stats.py: slopes per group over questions,
correct - incorrect and correct - other_question paired within questions, cut and uncut), over all
of them at once. A question is the pairing unit as before, now one (run, probe, question): the same
question probed in another run or at another step has other weights and other trajectories.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from innerloop.distributed.lens import probe_stats


def _summary(data: dict | None):
    return None if data is None else SimpleNamespace(slope=data["slope"])


def read_records(run_dirs: list[Path]) -> list[SimpleNamespace]:
    """What probe_stats reads of a ProbeRecord (group, question, the two slopes), from each run's file."""
    records = []
    for run_dir in run_dirs:
        path = run_dir / "probe" / "probe.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: was the run probed (probe.every_steps > 0)?")
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            records.append(SimpleNamespace(group=r["group"], question_id=f"{run_dir}|{r['label']}|{r['question_id']}",
                                           summary=_summary(r["summary"]), cut_summary=_summary(r["cut_summary"])))
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the comparisons as JSON here")
    args = parser.parse_args()
    found = probe_stats.comparisons(read_records(args.run_dirs))
    print(probe_stats.format_comparisons(found))
    if args.out:
        args.out.write_text(json.dumps(found, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
