"""What a job's exit status means, appended to its log by the rules when the job fails, so a
job killed from outside (memory limit, scheduler) is reported as such instead of as a
mystery exit:  python -m ecoflap.utils.exits STATUS"""
from __future__ import annotations

import signal
import sys

CAUSES = {
    signal.SIGKILL: "killed with SIGKILL: most often the kernel's out-of-memory killer or a memory limit (a memory "
                    "cgroup, SLURM's --mem); also `scancel --signal=KILL`. Give the job more memory (resources.mem_mb), "
                    "or lower batch sizes / calibration samples",
    signal.SIGTERM: "terminated with SIGTERM: usually the scheduler (SLURM time limit, scancel) or a shutdown. Raise "
                    "the rule's runtime, or rerun: outputs are written atomically, so nothing half-written is left",
    signal.SIGINT: "interrupted (Ctrl-C)",
    signal.SIGSEGV: "crashed with SIGSEGV (a native library fault); rerun once, and report it with this log if it "
                    "happens again",
    signal.SIGBUS: "crashed with SIGBUS: often a file being read that shrank (a truncated checkpoint) or a full /dev/shm",
}


def explain(status: int) -> str:
    """A shell status: 128 + N means the process died of signal N."""
    if status > 128 and status - 128 in {s.value for s in signal.Signals}:
        sig = signal.Signals(status - 128)
        return f"ecoflap: the job exited with status {status}: {CAUSES.get(sig, f'killed by {sig.name}')}."
    if status == 1:
        return "ecoflap: the job exited with status 1: the error above says what failed and what to do."
    if status in (126, 127):  # the shell could not run the interpreter
        return (f"ecoflap: the job exited with status {status}: the shell could not run the interpreter. If this "
                "model names its own (models.<name>.python, e.g. .venv-eva/bin/python), create that environment "
                "first (bash workflow/scripts/setup_env.sh --eva) or fix the path.")
    return f"ecoflap: the job exited with status {status}."


if __name__ == "__main__":
    print(explain(int(sys.argv[1])))
