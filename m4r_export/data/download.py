"""Download MovieLens from GroupLens, verify it, and convert it to a RecBole ``.inter`` file.

``download_movielens("movielens-100k")`` fetches the official archive into the cache
(``$M4R_CACHE``, else ``$XDG_CACHE_HOME/m4r``, else ``~/.cache/m4r``), checks its size and sha256
against the constants below, and writes ``<cache>/ml-100k/ml-100k.inter`` (RecBole layout, rows in
the archive's order so ids map exactly as in RecBole). A mismatch deletes the download and raises a
clear error; nothing half-written is left behind.

The sha256/size constants are those recorded for the same URLs in TensorFlow Datasets'
``url_checksums/movielens.txt``; the md5 values match GroupLens' published ``.md5`` files as
quoted by several independent projects. They are checked, never trusted blindly: a mismatch is an
error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import UsageError
from ..fileio import atomic_write, ensure_writable_dir
from .readers import movielens_to_inter_rows


@dataclass(frozen=True)
class ArchiveSpec:
    name: str  # CLI name, e.g. movielens-100k
    dirname: str  # RecBole dataset name and folder, e.g. ml-100k
    url: str
    size: int
    sha256: str
    md5: str
    member: str  # ratings file inside the archive
    fmt: str  # reader format of that member


MOVIELENS: dict[str, ArchiveSpec] = {
    "movielens-100k": ArchiveSpec(
        name="movielens-100k",
        dirname="ml-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        size=4924029,
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        md5="0e33842e24a9c977be4e0107933c0723",
        member="ml-100k/u.data",
        fmt="ml-100k",
    ),
    "movielens-1m": ArchiveSpec(
        name="movielens-1m",
        dirname="ml-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        size=5917549,
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        md5="c4d9eecfca2ab87c1945afe126590906",
        member="ml-1m/ratings.dat",
        fmt="ml-1m",
    ),
}

#: fetch(url, fileobj) writes the resource's bytes into fileobj
FetchFn = Callable[[str, IO[bytes]], None]


def default_cache_dir() -> Path:
    if os.environ.get("M4R_CACHE"):
        return Path(os.environ["M4R_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "m4r"
    return Path.home() / ".cache" / "m4r"


def urllib_fetch(url: str, out: IO[bytes]) -> None:
    """Stream ``url`` (http(s) or file://) into ``out``."""
    req = urllib.request.Request(url, headers={"User-Agent": "m4r-export"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        while True:
            block = resp.read(1 << 20)
            if not block:
                break
            out.write(block)


def _spec(name: str) -> ArchiveSpec:
    key = name.lower()
    aliases = {s.dirname: k for k, s in MOVIELENS.items()}
    key = aliases.get(key, key)
    if key not in MOVIELENS:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(MOVIELENS)}")
    return MOVIELENS[key]


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def verify_archive(
    path: Path, spec: ArchiveSpec, *, sha256: str | None = None, size: int | None = None
) -> None:
    """Raise :class:`UsageError` unless ``path`` has the expected size and sha256."""
    want_sha = (sha256 or spec.sha256).lower()
    want_size = spec.size if size is None and sha256 is None else size
    got_size, got_sha = _digest(path)
    if want_size is not None and got_size != want_size:
        raise UsageError(
            f"{path}: size {got_size} bytes does not match the expected {want_size} bytes for {spec.url}; "
            "the download is incomplete or the file changed upstream. Delete it and download again"
        )
    if got_sha != want_sha:
        raise UsageError(
            f"{path}: sha256 {got_sha} does not match the expected {want_sha} for {spec.url}; "
            "the download is corrupted or not the official archive. Delete it and download again"
        )


def convert_archive(
    archive: str | os.PathLike[str], spec: ArchiveSpec | str, out: str | os.PathLike[str]
) -> Path:
    """Convert a MovieLens zip into a RecBole ``.inter`` file at ``out`` (rows in archive order)."""
    if isinstance(spec, str):
        spec = _spec(spec)
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            member = spec.member if spec.member in names else None
            if member is None:  # tolerate a different top-level folder name
                base = spec.member.rsplit("/", 1)[-1]
                member = next((n for n in names if n.rsplit("/", 1)[-1] == base), None)
            if member is None:
                raise UsageError(
                    f"archive {archive} has no {spec.member} (it holds {len(names)} entries); "
                    f"it is not the {spec.name} archive. Delete it and download again"
                )
            data = zf.read(member)
    except zipfile.BadZipFile as exc:
        raise UsageError(
            f"archive {archive} is not a valid zip file ({exc}); delete it and download again"
        ) from exc
    rows = movielens_to_inter_rows(data, spec.fmt, f"{archive}:{member}")
    if not rows:
        raise UsageError(f"{archive}:{member} holds no ratings; the archive is damaged, download it again")
    out = Path(out)
    with atomic_write(out, "w") as fh:
        fh.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        fh.writelines(f"{r}\n" for r in rows)
    return out


def fetch_archive(
    spec: ArchiveSpec,
    dest: Path,
    *,
    url: str | None = None,
    fetch: FetchFn | None = None,
    sha256: str | None = None,
    size: int | None = None,
) -> Path:
    """Download ``spec``'s archive into ``dest`` (verified; reuses a verified cached copy)."""
    ensure_writable_dir(dest)
    target = dest / Path(spec.url).name
    if target.exists():
        try:
            verify_archive(target, spec, sha256=sha256, size=size)
            return target
        except UsageError:
            target.unlink()  # stale or damaged cache entry: fetch again
    src = url or spec.url
    fetch = fetch or urllib_fetch
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=dest)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                fetch(src, fh)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise UsageError(
                    f"could not download {src}: {reason}. Check the network connection, or download the file "
                    f"by hand and run `m4r data download {spec.name} --archive FILE`"
                ) from exc
        verify_archive(tmp, spec, sha256=sha256, size=size)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return target


def download_movielens(
    name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    archive: str | os.PathLike[str] | None = None,
    url: str | None = None,
    fetch: FetchFn | None = None,
    sha256: str | None = None,
    size: int | None = None,
    force: bool = False,
) -> Path:
    """Return the path of ``<dest>/<ml-xx>/<ml-xx>.inter``, downloading and converting if needed.

    ``archive``: use an already downloaded zip instead of the network (still verified).
    ``url``/``fetch``: alternative source (a mirror, a ``file://`` URL) or fetch function; the
    checksum is still the official one unless ``sha256`` (and ``size``) override it.
    """
    spec = _spec(name)
    root = Path(dest).expanduser() if dest is not None else default_cache_dir()
    out = root / spec.dirname / f"{spec.dirname}.inter"
    if out.exists() and not force and archive is None:
        return out
    if archive is not None:
        zip_path = Path(archive).expanduser()
        if not zip_path.is_file():
            raise UsageError(f"archive {zip_path} does not exist; pass the path of the downloaded {spec.url}")
        verify_archive(zip_path, spec, sha256=sha256, size=size)
    else:
        zip_path = fetch_archive(spec, root / "downloads", url=url, fetch=fetch, sha256=sha256, size=size)
    return convert_archive(zip_path, spec, out)
