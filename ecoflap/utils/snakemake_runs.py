"""Snakemake runs over several config files (the paper's tables): planned side by side, since each
dry run is a second of one core, or run one after another with the user's own arguments (cores, a
profile). Each call is the workflow a user runs by hand: `snakemake --configfile <config> ...`."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

_STATS_ROW = re.compile(r"^(\w+)\s+(\d+)$")


def _snakemake(config: str, args: list[str]) -> list[str]:
    # targets and options before --configfile, which would read further words as config files
    return [sys.executable, "-m", "snakemake", *args, "--configfile", config]


def job_stats(output: str) -> dict[str, int]:
    """{rule: jobs, ..., "total": n} from Snakemake's "Job stats" table."""
    lines = output.splitlines()
    if "Job stats:" not in lines:
        return {}
    stats = {}
    for line in lines[lines.index("Job stats:") + 3:]:
        m = _STATS_ROW.match(line.strip())
        if not m:
            break
        stats[m.group(1)] = int(m.group(2))
    return stats


def dry_run_all(configs: dict[str, str], args: list[str]) -> dict[str, dict[str, int]]:
    """Every config planned (snakemake -n), two at a time; the jobs each would run. A config that
    does not plan raises with Snakemake's message."""
    def plan(item):
        name, config = item
        out = subprocess.run(_snakemake(config, ["-n", *args]), capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{name} ({config}) does not plan:\n{out.stderr[-3000:]}")
        return name, job_stats(out.stdout + out.stderr)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(plan, configs.items()))


def run_all(configs: dict[str, str], args: list[str]) -> None:
    """Each config run to completion in turn (a table whose run fails stops the rest: its
    message is Snakemake's, and a rerun resumes where it stopped)."""
    for name, config in configs.items():
        log.info("running %s (%s): snakemake %s", name, config, " ".join(args))
        out = subprocess.run(_snakemake(config, args))
        if out.returncode != 0:
            raise RuntimeError(f"{name}: snakemake --configfile {config} {' '.join(args)} failed (exit "
                               f"{out.returncode}); its log says why, and rerunning resumes where it stopped")
