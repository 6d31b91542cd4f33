"""The run directory: created up front, refused if it would overwrite a run by accident."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


class RunDirError(ValueError):
    """The run directory cannot be used; the message says why and what to do."""


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse, before any work is done, an output file that could not be written at the end:
    a path that is a folder, or one below a file. Missing folders are created on writing."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give the path of a file")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def create(cls, output: str | None, overwrite: bool = False) -> RunDir:
        path = Path(output) if output else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path}: exists and is not a directory")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"{path}: run directory exists and is not empty; choose another --output "
                    "or pass --overwrite to replace it"
                )
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise RunDirError(f"{path}: cannot write the run directory ({err.strerror})") from None
        if not os.access(path, os.W_OK):
            raise RunDirError(f"{path}: run directory is not writable")
        return cls(path)

    @classmethod
    def resume(cls, path: str | Path) -> RunDir:
        """An existing run directory to continue, checked to be writable."""
        path = Path(path)
        if not path.is_dir():
            raise RunDirError(f"--resume {path}: no such run directory")
        try:
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise RunDirError(f"{path}: cannot write the run directory ({err.strerror})") from None
        return cls(path)
