"""Output folders, and the promises around them: an output never overlaps an input, `--overwrite` replaces only a
folder that is empty or that mfakit wrote, one run at a time writes an output, a folder appears under its name only
when finished, and files are written then renamed."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mfakit.checkpoint import FINETUNE_LOG, TRAINER_DIR, CheckpointError

LOCK_FILE = ".lock"
FINETUNE_STAGING = ".final"


def partial_folder(out: Path) -> Path:
    """Where a resumable run builds `out` (hidden, and without a config.json until it is finished)."""
    return Path(out).parent / f".{Path(out).name}.partial"


def written_by_mfakit(folder: Path) -> bool:
    """A folder that mfakit finished (its config.json records a conversion, fine-tune or GGUF import by mfakit) or
    a fine-tuning run that mfakit started and that has not finished (only its log and trainer state)."""
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (ValueError, UnicodeDecodeError):
            return False
        conversion = data.get("conversion") if isinstance(data, dict) else None
        return isinstance(data, dict) and (
            (isinstance(conversion, dict) and "mfakit_version" in conversion) or "mfakit_import" in data
        )
    entries = {p.name for p in folder.iterdir()}
    return bool(entries) and entries <= {FINETUNE_LOG, TRAINER_DIR, FINETUNE_STAGING}


def folder_size(folder: Path) -> str:
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"


def check_output(out: Path, inputs: list[tuple[str, Path]], overwrite: bool) -> None:
    """Refuse, before any work, an output folder that overlaps an input (is it, lies inside it, or holds it), that
    is or holds the current folder, that exists without `overwrite`, or that `overwrite` may not replace: anything
    but an empty folder or one that mfakit wrote. `inputs` pairs what each input is ("the source checkpoint") with
    its path."""
    out = Path(out)
    resolved = out.resolve()
    for what, source in inputs:
        inside = Path(source).resolve()
        if resolved == inside:
            raise CheckpointError(f"{out} is {what}; write the output elsewhere")
        if resolved in inside.parents or inside in resolved.parents:
            relation = "holds" if resolved in inside.parents else "lies inside"
            raise CheckpointError(f"the output {out} {relation} {what} {source}; write the output elsewhere")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise CheckpointError(f"the output {out} is or holds the current folder; write the output elsewhere")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    if not overwrite:
        raise CheckpointError(f"{out} exists (pass --overwrite to replace it)")
    names = sorted(p.name for p in out.iterdir())
    if names and not written_by_mfakit(out):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise CheckpointError(
            f"{out} holds files mfakit did not write ({shown}); --overwrite replaces only mfakit's own outputs"
        )


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on FOLDER/.lock for the block (the folder is made if needed): a second run on the
    same folder is refused at once. The OS releases the lock when the process ends, however it ends, so a killed
    run never blocks its resumption. A folder left holding nothing but the lock is removed at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise CheckpointError(f"another mfakit run is writing {folder}; wait for it to finish") from err
        yield
    finally:
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def clear_folder(folder: Path, keep: tuple[str, ...] = (LOCK_FILE,)) -> None:
    """Remove everything in `folder` but the names in `keep`."""
    for item in folder.iterdir():
        if item.name in keep:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


@contextmanager
def atomic_folder(
    out: Path, overwrite: bool, tmp: Path | None = None, keep: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """A temporary folder beside `out` (`tmp`, or a fresh one), renamed to `out` only when the block finishes, so an
    interrupted run never leaves a folder that looks like a checkpoint. If the block fails, the temporary folder is
    removed unless `keep(tmp)` says it holds resumable work. The caller has checked `out` (`check_output`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if keep is None or not keep(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / LOCK_FILE).unlink(missing_ok=True)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file through `write(tmp)` beside it, then rename it into place: a run killed while writing leaves
    the previous file (or none), never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
