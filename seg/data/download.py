"""Safe downloading and unpacking for the dataset preparation scripts in ``datasets/``.

- :func:`download`: HTTP(S) or ``file://`` to a file, with a progress bar, resume of an interrupted transfer
  (``<destination>.partial`` plus an HTTP Range request), checksum verification before an atomic rename, and no
  second transfer when the destination is already there with the right checksum.
- :func:`safe_extract`: unpack a zip or tar archive only if every member is a plain file or folder that stays
  inside the destination (no absolute paths, ``..``, links, devices); the whole member list is checked before
  anything is written, and each file appears atomically (a half-written file never carries its final name).
- :class:`PreparationError`: the one-line, user-facing error both raise; :func:`run_cli` turns it into a message
  on stderr and an exit status, without a traceback.

Only the standard library (urllib, zipfile, tarfile) and tqdm are used.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import os
import re
import secrets
import shutil
import stat
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

from tqdm import tqdm

PathLike = Union[str, os.PathLike]

CHUNK_SIZE = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar
USER_AGENT = "seg-dataset-preparation (python urllib)"
DIGEST_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64}


class PreparationError(RuntimeError):
    """A user-facing failure: one line naming the file or flag and what was expected.

    ``exit_status`` is what a command-line script exits with: 2 for mistakes the user can fix (wrong file, missing
    folder, bad flag), 1 for failures of the environment (see :class:`DownloadError`).
    """

    exit_status = 2


class DownloadError(PreparationError):
    """The transfer itself failed (unreachable server, HTTP error, interrupted connection); rerunning resumes."""

    exit_status = 1


# ---------------------------------------------------------------------------------------------------- checksums


def _expected_digests(**digests: Optional[str]) -> Dict[str, str]:
    """The requested {algorithm: lower-case hex digest}, checking each is well formed."""
    expected = {}
    for algorithm, value in digests.items():
        if value is None:
            continue
        value = value.strip().lower()
        if len(value) != DIGEST_LENGTHS[algorithm] or not re.fullmatch(r"[0-9a-f]+", value):
            raise PreparationError(
                f"{algorithm} checksum {value!r} is malformed; expected {DIGEST_LENGTHS[algorithm]} hex digits"
            )
        expected[algorithm] = value
    return expected


def file_digests(path: PathLike, algorithms: Sequence[str]) -> Dict[str, str]:
    """Hex digests of a file for each of ``algorithms`` (read once, in chunks)."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_SIZE), b""):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _mismatches(expected: Mapping[str, str], actual: Mapping[str, str]) -> List[str]:
    return [f"{name} is {actual[name]}, expected {value}" for name, value in expected.items() if actual[name] != value]


def verify_checksum(
    path: PathLike, sha256: Optional[str] = None, md5: Optional[str] = None, sha1: Optional[str] = None
) -> None:
    """Raise PreparationError naming the file, the expected and the actual digest unless they all match."""
    expected = _expected_digests(sha256=sha256, md5=md5, sha1=sha1)
    if not expected:
        return
    if not Path(path).is_file():
        raise PreparationError(f"{path}: no such file")
    wrong = _mismatches(expected, file_digests(path, list(expected)))
    if wrong:
        raise PreparationError(f"{path}: checksum mismatch: " + "; ".join(wrong))


# ---------------------------------------------------------------------------------------------------- download


@dataclass
class _Body:
    """An open transfer: ``stream`` yields the file's bytes from ``start`` on; ``total`` is the full size."""

    stream: BinaryIO
    start: int
    total: Optional[int]


class _RestartFromZero(Exception):
    """The partial file cannot be continued (bad Content-Range, larger than the source); start over."""


def _open_file_url(url: str, offset: int) -> _Body:
    """``file://`` has no Range requests: emulate resume by seeking to the partial file's size."""
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise PreparationError(f"{url}: file:// URLs must name a local file (file:///path)")
    path = Path(urllib.request.url2pathname(parsed.path))
    try:
        size = path.stat().st_size
        stream = open(path, "rb")
    except FileNotFoundError:
        raise PreparationError(f"{url}: no such file ({path})") from None
    except OSError as error:
        raise PreparationError(f"{url}: cannot read {path} ({error.strerror})") from None
    if offset > size:
        stream.close()
        raise _RestartFromZero()
    stream.seek(offset)
    return _Body(stream, offset, size)


def _open_http_url(url: str, offset: int, timeout: float) -> _Body:
    """Open ``url``, asking for the bytes from ``offset`` on when resuming.

    A server that honours the Range request answers 206 with ``Content-Range: bytes <offset>-<end>/<total>``;
    one that does not answers 200 with the whole file, and the caller then restarts the partial file cleanly.
    """
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        content_range = error.headers.get("Content-Range", "") if error.headers else ""
        error.close()
        if error.code == 416 and offset:
            # "Range Not Satisfiable": the partial file may already be complete (bytes */<total>).
            match = re.fullmatch(r"bytes \*/(\d+)", content_range.strip())
            if match and int(match.group(1)) == offset:
                return _Body(io.BytesIO(b""), offset, offset)
            raise _RestartFromZero() from None
        raise DownloadError(f"{url}: HTTP error {error.code} ({error.reason})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        raise DownloadError(f"{url}: cannot connect ({reason})") from None

    if offset and response.status == 206:
        content_range = response.headers.get("Content-Range", "").strip()
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range)
        if not match or int(match.group(1)) != offset:
            response.close()
            raise _RestartFromZero()
        total = None if match.group(3) == "*" else int(match.group(3))
        return _Body(response, offset, total)
    # 200: the whole file, either because nothing was asked to be skipped or because Range was not honoured.
    length = response.headers.get("Content-Length")
    return _Body(response, 0, int(length) if length and length.isdigit() else None)


def _open_url(url: str, offset: int, timeout: float) -> _Body:
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        return _open_file_url(url, offset)
    if scheme in ("http", "https"):
        return _open_http_url(url, offset, timeout)
    raise PreparationError(f"{url}: unsupported URL scheme {scheme or '(none)'!r}; expected http, https or file")


def _note(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def download(
    url: str,
    destination: PathLike,
    sha256: Optional[str] = None,
    md5: Optional[str] = None,
    progress: bool = True,
    *,
    sha1: Optional[str] = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` (http, https or file) to ``destination`` and return its path.

    Bytes go to ``<destination>.partial``; an interrupted download is resumed from there on the next call (HTTP
    Range request; a server that ignores it makes the file restart from zero). Given checksums (hex digests) are
    verified before the partial file is renamed into place with ``os.replace``, so ``destination`` only ever holds
    a complete, verified file. A mismatch deletes the partial file and raises :class:`PreparationError` naming the
    file, the expected and the actual digest.

    Idempotent: when ``destination`` exists and matches the checksums, nothing is transferred. Without a checksum
    an existing ``destination`` is trusted as it is (it can only have been put there whole).

    Raises:
        PreparationError: malformed checksum, unsupported URL, missing local file, checksum mismatch.
        DownloadError: the server could not be reached, answered an HTTP error, or the transfer broke off (the
            partial file is kept, so calling again resumes).
    """
    destination = Path(destination)
    expected = _expected_digests(sha256=sha256, md5=md5, sha1=sha1)
    if destination.is_file():
        if not expected:
            _note(progress, f"{destination}: already downloaded (no checksum given to verify it)")
            return destination
        if not _mismatches(expected, file_digests(destination, list(expected))):
            _note(progress, f"{destination}: already downloaded, checksum OK")
            return destination
        # A wrong existing file is only replaced once a verified download is complete.
        _note(progress, f"{destination}: exists but its checksum is wrong; downloading it again")

    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    offset = partial.stat().st_size if partial.is_file() else 0
    try:
        body = _open_url(url, offset, timeout)
    except _RestartFromZero:
        _note(progress, f"{partial}: cannot be continued from {url}; starting again from zero")
        partial.unlink()
        offset = 0
        body = _open_url(url, 0, timeout)

    hashers = {name: hashlib.new(name) for name in expected}
    if body.start:
        _note(progress, f"{destination.name}: resuming at {body.start:,} bytes")
        with open(partial, "rb") as previous:  # the digest must cover the bytes already on disk
            for chunk in iter(lambda: previous.read(CHUNK_SIZE), b""):
                for hasher in hashers.values():
                    hasher.update(chunk)
    elif offset:
        _note(progress, f"{destination.name}: the server does not support resuming; starting again from zero")

    received = body.start
    try:
        with body.stream, open(partial, "ab" if body.start else "wb") as output, tqdm(
            total=body.total, initial=body.start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=destination.name, disable=not progress, dynamic_ncols=True,
        ) as bar:
            for chunk in iter(lambda: body.stream.read(CHUNK_SIZE), b""):
                output.write(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(
            f"{url}: transfer interrupted after {received:,} bytes ({error}); run again to resume from {partial}"
        ) from None

    if body.total is not None and received != body.total:
        if received > body.total:  # cannot be trusted for a resume either
            partial.unlink()
            raise DownloadError(f"{url}: received {received:,} bytes, more than the announced {body.total:,}")
        raise DownloadError(
            f"{url}: transfer ended after {received:,} of {body.total:,} bytes; run again to resume from {partial}"
        )
    wrong = _mismatches(expected, {name: hasher.hexdigest() for name, hasher in hashers.items()})
    if wrong:
        partial.unlink()
        raise PreparationError(
            f"{destination}: checksum mismatch after downloading {url}: " + "; ".join(wrong)
            + " (the download was deleted)"
        )
    os.replace(partial, destination)
    return destination


# ---------------------------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Member:
    """An archive entry that passed validation: where it goes (relative, POSIX) and what it is."""

    name: str  # as stored in the archive, for messages
    path: PurePosixPath  # normalised relative path under the destination
    is_dir: bool
    size: int
    entry: object  # zipfile.ZipInfo or tarfile.TarInfo


_ZIP_TYPES = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def _safe_relative(name: str) -> Tuple[Optional[PurePosixPath], str]:
    """(normalised relative path or None, reason it is refused). The path is empty for the archive root."""
    if "\x00" in name:
        return None, "its name contains a NUL byte"
    if "\\" in name:
        return None, "its name contains a backslash (a Windows path separator)"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None, "it is an absolute path"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None, "its path contains '..'"
    return PurePosixPath(*parts) if parts else PurePosixPath(), ""


def _zip_members(archive: zipfile.ZipFile) -> Iterator[Tuple[str, object, bool, int, str]]:
    """(name, entry, is_dir, size, refusal reason or '') for each zip entry."""
    for info in archive.infolist():
        mode = info.external_attr >> 16  # Unix st_mode in the high 16 bits (0 for archives made elsewhere)
        kind = stat.S_IFMT(mode)
        reason = ""
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            reason = f"it is {_ZIP_TYPES.get(kind, f'a special file (type {kind:#o})')}"
        elif info.flag_bits & 0x1:
            reason = "it is encrypted"
        yield info.filename, info, info.is_dir() or kind == stat.S_IFDIR, info.file_size, reason


def _tar_members(archive: tarfile.TarFile) -> Iterator[Tuple[str, object, bool, int, str]]:
    for info in archive.getmembers():
        reason = ""
        if info.issym():
            reason = f"it is a symbolic link (to {info.linkname!r})"
        elif info.islnk():
            reason = f"it is a hard link (to {info.linkname!r})"
        elif info.ischr() or info.isblk():
            reason = "it is a device file"
        elif info.isfifo():
            reason = "it is a FIFO"
        elif not (info.isreg() or info.isdir()):
            reason = f"it is a special member (tar type {info.type!r})"
        yield info.name, info, info.isdir(), info.size if info.isreg() else 0, reason


def _open_archive(archive: Path):
    """An open ZipFile or TarFile; PreparationError when it is missing or neither."""
    if not archive.is_file():
        raise PreparationError(f"{archive}: no such file")
    try:
        if zipfile.is_zipfile(archive):
            return zipfile.ZipFile(archive)
        if tarfile.is_tarfile(archive):
            return tarfile.open(archive, "r:*")
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise PreparationError(f"{archive}: unreadable archive ({error})") from None
    raise PreparationError(f"{archive}: not a zip or tar archive")


def _validated_members(archive: Path, opened) -> List[Member]:
    """Every member of ``opened``, or PreparationError naming the archive and the first hostile member."""
    try:
        entries = list(_zip_members(opened) if isinstance(opened, zipfile.ZipFile) else _tar_members(opened))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise PreparationError(f"{archive}: unreadable archive ({error})") from None
    members = []
    for name, entry, is_dir, size, reason in entries:
        path, path_reason = _safe_relative(name)
        reason = path_reason or reason
        if reason:
            raise PreparationError(
                f"{archive}: refusing to extract member {name!r}: {reason}; nothing was extracted"
            )
        if path.parts:  # the archive root itself ("./") needs nothing
            members.append(Member(name, path, is_dir, size, entry))
    return members


def archive_members(archive: PathLike) -> List[Member]:
    """The validated members of a zip or tar archive (raises like :func:`safe_extract` on a hostile one)."""
    archive = Path(archive)
    with _open_archive(archive) as opened:
        return _validated_members(archive, opened)


def _check_free_space(archive: Path, destination: Path, members: Sequence[Member]) -> None:
    existing = destination
    while not existing.exists():
        existing = existing.parent
    needed = 0
    for member in members:
        if not member.is_dir:
            target = destination.joinpath(*member.path.parts)
            needed += max(0, member.size - (target.stat().st_size if target.is_file() else 0))
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise PreparationError(
            f"{archive}: extracting needs {needed / 2**30:.1f} GiB but {existing} has {free / 2**30:.1f} GiB free"
        )


def _write_atomically(source: BinaryIO, target: Path, bar: tqdm) -> None:
    """Copy ``source`` to a hidden temporary file beside ``target``, then rename it into place."""
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.extracting")
    # O_EXCL: never write through something already there; mode 0o666 lets the umask decide permissions
    # (the archive's own permission bits, setuid included, are deliberately not applied).
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as output:
            for chunk in iter(lambda: source.read(CHUNK_SIZE), b""):
                output.write(chunk)
                bar.update(len(chunk))
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def safe_extract(archive: PathLike, destination: PathLike, progress: bool = True) -> List[Path]:
    """Extract a zip or tar (optionally gzip/bz2/xz-compressed) archive under ``destination``.

    Every member is validated before anything is written; the archive is refused, with a PreparationError naming
    it and the offending member, if any member has an absolute path, a ``..`` component, a backslash or NUL in
    its name, is a symbolic or hard link, a device, FIFO or other special file, or is encrypted. Files are
    written to a temporary name and renamed into place, so an interrupted extraction never leaves a truncated
    file under its final name; existing files are overwritten. Permission bits and owners from the archive are
    not applied. A compressed tar is decompressed twice (once to list, once to extract).

    Returns:
        The paths of the extracted files, in archive order.
    """
    archive, destination = Path(archive), Path(destination)
    with _open_archive(archive) as opened:
        members = _validated_members(archive, opened)
        destination.mkdir(parents=True, exist_ok=True)
        _check_free_space(archive, destination, members)
        written = []
        files = [m for m in members if not m.is_dir]
        with tqdm(
            total=sum(m.size for m in files), unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"extracting {archive.name}", disable=not progress, dynamic_ncols=True,
        ) as bar:
            for member in members:
                target = destination.joinpath(*member.path.parts)
                try:
                    if member.is_dir:
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if isinstance(opened, zipfile.ZipFile):
                        source = opened.open(member.entry)
                    else:
                        source = opened.extractfile(member.entry)
                    with source:
                        _write_atomically(source, target, bar)
                except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
                    raise PreparationError(
                        f"{archive}: member {member.name!r} is corrupt ({error}); download the archive again"
                    ) from None
                except OSError as error:
                    raise PreparationError(f"{target}: cannot write ({error.strerror or error})") from None
                written.append(target)
    return written


# ---------------------------------------------------------------------------------------------------- scripts


def parse_counts(text: str) -> Dict[str, int]:
    """``"train=3,val=2"`` -> ``{"train": 3, "val": 2}`` (argparse type for the expected-count override)."""
    counts = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        split, _, number = item.partition("=")
        if not number.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not SPLIT=COUNT")
        counts[split.strip()] = int(number)
    return counts


def default_root(name: str, root: Optional[PathLike]) -> Path:
    """Where a preparation script puts dataset ``name``: the same rule the adapters use to find it
    (``root``, else ``$SEG_DATA_ROOT/<name>``, else ``./datasets/<name>``)."""
    if root is not None:
        return Path(root)
    if os.environ.get("SEG_DATA_ROOT"):
        return Path(os.environ["SEG_DATA_ROOT"]) / name
    return Path("datasets") / name


def run_cli(main: Callable[[], int]) -> int:
    """Run a script's ``main``; a PreparationError becomes ``error: <message>`` on stderr and its exit status."""
    try:
        return main()
    except PreparationError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
