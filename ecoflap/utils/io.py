"""Atomic writes, hashing and provenance records shared by every stage.

Every file a stage writes goes through `atomic_path`: it is written under a temporary
name in the destination folder and renamed into place only when complete, so a killed
job leaves either the old state or the finished file, never half a file.
"""
from __future__ import annotations

import contextlib
import errno
import importlib.metadata as md
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from safetensors import safe_open

from ecoflap.utils import leases

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch and safetensors load inside the tensor helpers: the stages that write
    import torch   # only JSON (allocate, aggregate) start without them


def _human(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"


class StorageError(RuntimeError):
    """The disk said no (full, quota, read-only, permission): which path, and what to do."""


def _storage_error(exc: BaseException, final: Path, expected_bytes: int | None) -> StorageError | None:
    """Turn a full disk or a refused write, however the writer reports it (OSError, or
    safetensors' own error carrying the OS message), into a message naming the path, the space
    needed and the space free."""
    chain, cur = [], exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    where = final.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if codes & {errno.ENOSPC, errno.EDQUOT} or "no space left" in text or "quota exceeded" in text:
        free = shutil.disk_usage(where).free
        need = f"about {_human(expected_bytes)}" if expected_bytes else "more space"
        return StorageError(f"no space left writing {final}: it needs {need}, {_human(free)} are free on "
                            f"the file system of {where}. Nothing was written under the final name. Free space (or "
                            "set pruning.keep_checkpoints: false, or run from a larger disk) and rerun")
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS} or "permission denied" in text or "read-only" in text:
        return StorageError(f"cannot write {final}: permission denied or read-only file system under {where} "
                            f"(running as uid {os.getuid()}); make it writable or run from another folder, then rerun")
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds. A full
    or read-only disk ends in a StorageError naming the path (and, with `expected_bytes`, the
    space needed), with the temporary removed."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:
        raise (_storage_error(exc, final, expected_bytes) or exc) from exc
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)  # mkstemp/mkdtemp create 0600/0700
        if is_dir and final.exists():
            # a folder cannot be renamed over a non-empty one: move the old one aside under a
            # hidden name (one rename), move the new one in (one rename), then delete the old.
            # Deleting the old one first left, when interrupted, a folder half deleted under
            # the final name, and nothing at all between the deletion and the rename.
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, aside)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(aside, final)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        storage = _storage_error(exc, final, expected_bytes) if isinstance(exc, Exception) else None
        if storage is not None:
            raise storage from exc
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it and rerun the rule that writes it") from exc


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


METADATA_KEY = "ecoflap"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Tensors and their metadata, byte-identical for identical inputs: safetensors writes
    several metadata keys in a random (hash map) order, which made the same calibration set's
    file, and every input hash naming it, differ from run to run. So the metadata is one key,
    `ecoflap`, holding sorted JSON (`tensor_metadata` reads it back)."""
    from safetensors.torch import save_file  # imports torch: only where tensors are written, not in allocate/aggregate

    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)


def tensor_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata `save_tensors` wrote."""
    with safe_open(str(path), framework="numpy") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # imports torch (see save_tensors)

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files are read (no pickle loads)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); delete it and rerun the rule that writes it") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if "torch" in sys.modules and isinstance(obj, sys.modules["torch"].Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


_HASHED: dict[tuple[int, int, int, int, int], str] = {}  # (device, inode, size, mtime, ctime) -> SHA-256
RACY_NS = 2_000_000_000  # a file changed this recently is hashed again every time (see sha256_file)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file. A job verifies a checkpoint's weights on load and hashes them again
    for its provenance, and `prune` hashes what it saved before and after renaming it into
    place: the second time is answered from memory while the file (inode, size, modification
    and change times) is unchanged. The change time is in the key because the modification
    time can be set back (`cp -p`, `rsync -t`, `touch -r`) and the change time cannot. A file
    whose times are within RACY_NS of now is not remembered (git's "racily clean" rule): a
    later write in the same clock tick (file times are coarse, a few ms on many kernels), or a
    new file given the same inode, would have the same key."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _HASHED:
        return _HASHED[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
        _HASHED[key] = h.hexdigest()
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """Hash of a file, or of a folder's files (names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


CHECKSUMS = "ecoflap_checksums.json"
CHECKSUMS_VERSION = 2


def _checkpoint_files(folder: Path) -> list[Path]:
    """Every file a load of this checkpoint reads (weights, config.json, generation config,
    tokenizer, processor, InstructBLIP's qformer_tokenizer/), hidden files and the record aside."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name != CHECKSUMS
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def write_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """Record the SHA-256 of every file of a checkpoint beside them, so every later load
    notices a file that changed on disk (a bad copy, a flipped byte, an edited config.json)
    instead of using it. Returns the recorded hashes."""
    folder = Path(folder)
    sums = {str(f.relative_to(folder)): sha256_file(f) for f in _checkpoint_files(folder)}
    write_json(folder / CHECKSUMS, {"version": CHECKSUMS_VERSION, "files": sums})
    return sums


def verify_checksums(folder: str | os.PathLike, rule: str = "the rule that writes it (download_model for "
                     "results/<model>/model, prune for a pruned checkpoint)") -> None:
    """Every recorded file present and unchanged, and no file that was not recorded; the
    message names the file and what to rerun. Folders without a record (a user's local
    model before its copy) pass."""
    folder = Path(folder)
    record = folder / CHECKSUMS
    if not record.exists():
        return
    data = read_json(record)
    fix = f"delete {folder} and rerun {rule}"
    if "version" not in data:  # written before every file was recorded: weights only
        log.warning("%s records the weight files only (written by an older version); its config and tokenizer "
                    "are not verified. To verify them too, %s", record, fix)
        expected, complete = data, False
    else:
        expected, complete = data["files"], True
    for name, digest in expected.items():
        f = folder / name
        if not f.exists():
            raise ValueError(f"{f} is missing (it was part of the checkpoint when it was written); {fix}")
        if sha256_file(f) != digest:
            raise ValueError(f"{f} differs from when it was written (SHA-256 mismatch); {fix}")
    if complete:
        extra = [str(f.relative_to(folder)) for f in _checkpoint_files(folder) if str(f.relative_to(folder)) not in expected]
        if extra:
            raise ValueError(f"{folder} holds files that were not part of the checkpoint when it was written: "
                             f"{', '.join(extra)}; remove them, or {fix}")


def git_commit(here: Path | None = None) -> str | None:
    """HEAD of the checkout the package runs from (`here`: a folder inside it), with "-dirty"
    when a tracked file is changed or the code holds a file not committed."""
    here = here or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        # tracked files changed anywhere, or a new file in the code (a module not committed yet runs too)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        new = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", ":/ecoflap", ":/workflow",
                              ":/tools", ":/Snakefile"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() or new.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    # tokenizers decides the calibration's token ids; accelerate places offloaded weights; the rest
    # where installed (open_clip and timm build EVA-CLIP, pycocoevalcap scores captions)
    for name in ("ecoflap", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "lm_eval", "snakemake",
                 "numpy", "timm", "torchvision", "open_clip_torch", "pycocoevalcap", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    if "torch" in sys.modules:  # stages that never load torch do not record its CUDA build
        versions["cuda"] = sys.modules["torch"].version.cuda or "none"
    return versions


def machine() -> dict[str, Any]:
    """Where a result was computed: float rounding, and so the last digits of masks and metrics,
    differs between CPU models."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    where = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
             "executor": "slurm" if os.environ.get("SLURM_JOB_ID") else "local"}
    if os.environ.get("SLURM_JOB_ID"):
        where["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        where["slurm_node"] = os.environ.get("SLURMD_NODENAME", platform.node())
    if leases.CURRENT is not None:
        where["gpu_lease"] = leases.CURRENT.record()
    gpus = cuda_devices()
    if gpus:
        where["gpus"] = gpus
    return where


def cuda_devices() -> list[dict[str, Any]]:
    """The GPUs this process used (name, memory, driver), when it initialised CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return []
    driver = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        driver = out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": props.name, "memory_gb": round(props.total_memory / 1e9, 1),
                        "driver": driver, "cuda": torch.version.cuda})
    return devices


def provenance(config: dict[str, Any], inputs: dict[str, str | os.PathLike] | None = None,
               input_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """What produced a result: the stage's settings, versions, commit, and input hashes."""
    hashes = dict(input_hashes or {})
    for name, p in (inputs or {}).items():
        hashes[name] = sha256_path(p)
    return {
        "config": config,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "machine": machine(),
        "input_sha256": hashes,
        "command": " ".join(sys.argv),
    }
