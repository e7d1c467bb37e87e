"""Atomic file writes and hashing: a crash never leaves a half-written file under a final name."""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from sslfw.errors import ConfigError, DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shared_mode(path: str | Path, folder: bool = False) -> None:
    """The permissions a plain open()/mkdir() would have given: mkstemp and mkdtemp create 0600/0700, which would
    hide a shared pack or checkpoint from lab-mates whatever their umask allows."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    shared_mode(tmp)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_dir(final: str | Path, owns: Callable[[str], bool]) -> Iterator[Path]:
    """A fresh sibling folder to write a set of files into; on success it replaces `final` as a whole (the old
    folder is renamed aside, the new one renamed in, then the old one deleted), on failure it is removed and
    `final` is untouched. `owns(name)` says which names in an existing `final` a previous run of the same
    command made: a folder holding anything else is refused, never replaced."""
    final = Path(final)
    if final.exists():
        if not final.is_dir():
            raise DataError(f"{final}: is a file; give a folder")
        others = sorted(p.name for p in final.iterdir() if not owns(p.name))
        if others:
            raise DataError(f"{final}: holds files this command did not write ({others[:3]}); choose a new folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    for left in final.parent.glob(f".{glob.escape(final.name)}.*.staged"):  # from a run that was killed
        pid = left.name.removeprefix(f".{final.name}.").split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".staged", dir=final.parent))
    shared_mode(stage, folder=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Sorted keys and a fixed indent so equal objects give equal bytes."""
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_csv(path: str | Path, header: list[str], rows: list[list]) -> None:
    with atomic_open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def read_json(path: str | Path, fix: str) -> Any:
    """A JSON file sslfw wrote, or one DataError naming it and saying how to `fix` it (half-written by a crash in
    an older version, edited by hand, truncated by a full disk): never a traceback."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({type(e).__name__}: {str(e)[:80]}); {fix}") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# A config is a few KB: these bounds keep a wrong file (a dataset csv passed as --config) or a YAML alias bomb (a few
# lines that expand to billions of values) to one line and exit 2, in bounded memory and time.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file within the bounds above, or one ConfigError naming it."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is not a config ({what}; configs are a few KB, at most 1 MiB)")
        data = yaml.safe_load(path.read_text())
    except RecursionError:  # "[[[[..." nested past the parser's stack
        raise ConfigError(f"{path}: nested too deeply to be a config ({what})") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read {what} ({str(e).splitlines()[0]})") from None
    _count_values(data, path)
    return data if data is not None else {}


def _count_values(tree: Any, path: Path) -> None:
    """Counts values as a walk visits them (an alias counts each time it is used), stopping at the bound: a tree
    that YAML aliases make exponential is refused after MAX_CONFIG_VALUES visits, not walked to the end."""
    stack, seen = [tree], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{path}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases?); not a config"
            )
        stack.extend(node.values() if isinstance(node, dict) else node if isinstance(node, list) else ())
