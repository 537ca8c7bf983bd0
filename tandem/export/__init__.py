"""Exports on disk: a tandem model as an HF folder (export/hf.py) or a GGUF file (export/gguf.py), with
a model card (export/card.py), published atomically. tandem/publish.py writes them (`tandem export`).

An export is written into a hidden sibling folder (`.NAME.tmp-PID`), checked, and only then
renamed to --out, so a reader never sees half an export and a failure leaves nothing behind. An
existing --out is refused unless --force, and --force replaces only an earlier export (a folder
holding tandem_export.json, GGUF exports included: they are a folder with model.gguf); anything
else is refused, never deleted. The old export is swapped out only after the new one is complete
(and gated). Staging folders a crashed export left next to --out (their PID is gone) are removed
when the next export to that --out starts.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from tandem.errors import ModelError, writing
from tandem.export.hf import PROVENANCE
from tandem.runs import file_in_the_way
from tandem.train.checkpoint import fsync_dir, pid_alive


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def is_export(path: Path) -> bool:
    """An export tandem wrote (HF or GGUF): a folder holding tandem_export.json, written last."""
    return path.is_dir() and (path / PROVENANCE).is_file()


def check_out(out: str | Path, force: bool) -> Path:
    out = Path(out)
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ModelError(f"{blocker} is a file; --out must be a folder (choose another --out)")
    if _nonempty(out) and not force:
        raise ModelError(f"{out} already exists; choose another --out or pass --force to replace it")
    if _nonempty(out) and not is_export(out):
        raise ModelError(f"{out} is not an earlier tandem export (no {PROVENANCE}); --force replaces only "
                         "exports, so choose another --out or empty that folder yourself")
    return out


def remove_export(out: Path) -> None:
    """Delete an export tandem wrote; anything else at `out` is left alone."""
    if is_export(out):
        shutil.rmtree(out, ignore_errors=True)


def _staged(out: Path, kind: str, pid: int) -> Path:
    return out.parent / f".{out.name}.{kind}-{pid}"


def clean_stale_staging(out: Path) -> None:
    """Remove what crashed exports to `out` left behind: `.NAME.tmp-PID` staging folders and
    `.NAME.old-PID` swapped-out exports whose process is gone (or is this one: a PID reused). A
    crash mid-swap leaves no --out but an `.old` export: that one is put back instead."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and pid_alive(pid):
            continue
        if match.group(1) == "tmp":
            shutil.rmtree(path, ignore_errors=True)
        elif is_export(path) and not out.exists():
            os.rename(path, out)
        else:
            remove_export(path)


@contextmanager
def staging(out: str | Path, force: bool):
    """Yield an empty hidden folder next to `out`; publish it as `out` if the block succeeds,
    delete it if the block raises (anything, Ctrl-C included)."""
    out = check_out(out, force)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _staged(out, "tmp", os.getpid())
        tmp.mkdir()
        try:
            yield tmp
            for file in tmp.iterdir():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
            check_out(out, force)  # someone may have created it meanwhile
            if is_export(out):
                old = _staged(out, "old", os.getpid())
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)  # out is absent or an empty folder, which rename replaces
            fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
