"""GPU leases: each running job gets devices of its own on a multi-GPU workstation.

Snakemake counts a `gpu` resource (`--resources gpu=4` lets four one-GPU jobs run at once)
but never says which device a job should use, so without this every job would take GPU 0.
A job that needs N GPUs takes an exclusive lease on N of the devices it can see before torch
is imported: one lock file per device, locked with flock and held by an open file for the
life of the process, so the kernel frees it when the process ends in any way (a SIGKILL or
a memory-limit kill too; no stale lease can outlive its job). The job then narrows
CUDA_VISIBLE_DEVICES to its devices, so torch sees them as cuda:0..N-1.

Which devices a job can see: CUDA_VISIBLE_DEVICES when the environment sets it (SLURM does;
it is respected and only narrowed, never widened), else the devices nvidia-smi lists.
ECOFLAP_GPU_IDS (comma-separated) replaces the discovery, for tests with simulated devices.
Lock files live in ECOFLAP_LEASE_DIR (default: a folder under the system's temporary
directory); inside a SLURM job they are scoped to the job, since SLURM already gave the job
its devices and several jobs on one node may each see theirs as "0".

No torch here: this module runs before torch is imported.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


@dataclass
class Lease:
    """The devices a process holds; the open files are the locks (closed when the process ends)."""

    devices: list[str]
    lock_dir: str
    waited_s: float = 0.0
    _files: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        for fh in self._files:
            fh.close()  # closing the descriptor drops the flock
        self._files.clear()

    def record(self) -> dict:
        return {"devices": self.devices, "lock_dir": self.lock_dir, "waited_s": round(self.waited_s, 1)}


def _ids(listed: str) -> list[str]:
    return [d.strip() for d in listed.split(",") if d.strip()]


def visible_devices() -> tuple[list[str], str]:
    """The device ids this process may use, and where that list came from."""
    simulated = os.environ.get("ECOFLAP_GPU_IDS")
    if simulated is not None:  # stripped as CUDA's list is: "0, 1" and "0,1" must lock the same files
        return _ids(simulated), "ECOFLAP_GPU_IDS"
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [d for d in _ids(inherited) if d != "-1"], "CUDA_VISIBLE_DEVICES"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return [], "nvidia-smi (not found)"
    if out.returncode != 0:
        return [], f"nvidia-smi (exit {out.returncode})"
    return [line.strip() for line in out.stdout.splitlines() if line.strip()], "nvidia-smi"


def default_lock_dir() -> str:
    explicit = os.environ.get("ECOFLAP_LEASE_DIR")
    if explicit:
        return explicit
    base = Path(tempfile.gettempdir()) / f"ecoflap-gpu-leases-{os.getuid()}"
    job = os.environ.get("SLURM_JOB_ID")
    return str(base / f"slurm-{job}" if job else base)


def take_lease(n: int, lock_dir: str | None = None, timeout_s: float | None = None, what: str = "") -> Lease:
    """Lock `n` free devices of those visible (waiting for them if all are taken) and narrow
    CUDA_VISIBLE_DEVICES to them."""
    devices, source = visible_devices()
    if n > len(devices):
        raise RuntimeError(
            f"this job needs {n} GPU(s) but {len(devices)} are visible (from {source}: {devices}). Lower the "
            "rule's gpu resource (resources: gpu in config.yaml), or run where more devices are visible")
    lock_dir = lock_dir or default_lock_dir()
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    lease = Lease([], lock_dir)
    t0 = time.monotonic()
    announced = False
    while True:
        for device in devices:
            if device in lease.devices:
                continue
            fh = open(Path(lock_dir) / f"gpu-{device.replace('/', '_')}.lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "job": what, "since": time.time()}) + "\n")
            fh.flush()
            lease.devices.append(device)
            lease._files.append(fh)
            if len(lease.devices) == n:
                break
        if len(lease.devices) == n:
            break
        # Several GPUs are taken one by one; giving back a partial set before waiting keeps two
        # multi-GPU jobs from each holding half of what the other needs.
        lease.release()
        lease.devices.clear()
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no {n} free GPU(s) among {devices} within {timeout_s:.0f} s (locks in {lock_dir})")
        if not announced:
            log.info("waiting for %d free GPU(s) among %s (held by other jobs; locks in %s)", n, devices, lock_dir)
            announced = True
        time.sleep(POLL_SECONDS)
    lease.waited_s = time.monotonic() - t0
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(lease.devices)
    log.info("GPU lease: device(s) %s of %s (from %s); CUDA_VISIBLE_DEVICES=%s%s", lease.devices, devices, source,
             os.environ["CUDA_VISIBLE_DEVICES"], f" after waiting {lease.waited_s:.1f} s" if announced else "")
    return lease


# The lease of this process, kept referenced so its locks live as long as the process.
CURRENT: Lease | None = None


def lease_for_job(n: int, device: str, what: str = "") -> Lease | None:
    """What the CLI calls first: a lease of `n` GPUs when the job will run on CUDA. With
    device auto and no GPU visible, the job runs on the CPU and takes nothing."""
    global CURRENT
    if n <= 0 or device == "cpu":
        return None
    devices, source = visible_devices()
    if not devices:
        if device.startswith("cuda"):
            raise RuntimeError(f"device {device} with gpu: {n}, but no GPU is visible (from {source}); set device: "
                               "auto or cpu in config.yaml, or run on a machine with a GPU")
        log.info("gpu: %d requested, no GPU visible (from %s): running on the CPU", n, source)
        return None
    CURRENT = take_lease(n, what=what)
    return CURRENT
