"""seg.data.download: file:// and loopback HTTP downloads (resume, checksums, idempotence) and safe extraction."""

from __future__ import annotations

import hashlib
import io
import random
import re
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from seg.data.download import DownloadError, PreparationError, archive_members, download, safe_extract

PAYLOAD = random.Random(0).randbytes(3 * 2**20 + 12345)  # several 1 MiB chunks and a ragged end
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "server" / "payload.bin"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


def partial_of(destination: Path) -> Path:
    return destination.with_name(destination.name + ".partial")


# ------------------------------------------------------------------------------------------------ file:// URLs


def test_file_url_download_verifies_and_leaves_no_partial(source, tmp_path):
    destination = tmp_path / "out" / "payload.bin"
    result = download(source.as_uri(), destination, sha256=SHA256, md5=MD5, progress=False)
    assert result == destination
    assert destination.read_bytes() == PAYLOAD
    assert not partial_of(destination).exists()


def test_second_call_with_the_right_checksum_transfers_nothing(source, tmp_path):
    destination = tmp_path / "payload.bin"
    download(source.as_uri(), destination, sha256=SHA256, progress=False)
    before = destination.stat().st_mtime_ns
    source.unlink()  # a second transfer would now fail: the call must not need the source at all
    assert download(source.as_uri(), destination, sha256=SHA256, progress=False) == destination
    assert destination.stat().st_mtime_ns == before
    assert destination.read_bytes() == PAYLOAD


def test_existing_destination_with_a_wrong_checksum_is_downloaded_again(source, tmp_path):
    destination = tmp_path / "payload.bin"
    destination.write_bytes(b"stale")
    download(source.as_uri(), destination, sha256=SHA256, progress=False)
    assert destination.read_bytes() == PAYLOAD


def test_file_url_resumes_from_the_partial_file(source, tmp_path):
    destination = tmp_path / "payload.bin"
    cut = 1_500_000
    partial_of(destination).write_bytes(PAYLOAD[:cut])
    download(source.as_uri(), destination, sha256=SHA256, progress=False)
    assert destination.read_bytes() == PAYLOAD
    assert not partial_of(destination).exists()


def test_resume_appends_after_the_partial_bytes_instead_of_starting_over(source, tmp_path):
    # A marker prefix of the partial's length survives only if the transfer really started at the offset.
    destination = tmp_path / "payload.bin"
    marker = b"M" * 1000
    partial_of(destination).write_bytes(marker)
    download(source.as_uri(), destination, progress=False)
    assert destination.read_bytes() == marker + PAYLOAD[len(marker):]


def test_checksum_mismatch_raises_naming_file_and_digests_and_leaves_nothing(source, tmp_path):
    destination = tmp_path / "payload.bin"
    wrong = "0" * 64
    with pytest.raises(PreparationError) as caught:
        download(source.as_uri(), destination, sha256=wrong, progress=False)
    message = str(caught.value)
    assert str(destination) in message and wrong in message and SHA256 in message
    assert "\n" not in message
    assert not destination.exists()
    assert not partial_of(destination).exists()


def test_a_corrupt_partial_is_caught_by_the_checksum_and_a_retry_recovers(source, tmp_path):
    destination = tmp_path / "payload.bin"
    partial_of(destination).write_bytes(b"X" * 5000)  # wrong bytes that resume would keep
    with pytest.raises(PreparationError, match="checksum mismatch"):
        download(source.as_uri(), destination, md5=MD5, progress=False)
    assert not destination.exists() and not partial_of(destination).exists()
    download(source.as_uri(), destination, md5=MD5, progress=False)
    assert destination.read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"sha256": "abc"}, "sha256 checksum 'abc' is malformed; expected 64 hex digits"),
        ({"md5": "z" * 32}, "md5 checksum .* is malformed"),
    ],
)
def test_malformed_checksums_are_refused(source, tmp_path, kwargs, pattern):
    with pytest.raises(PreparationError, match=pattern):
        download(source.as_uri(), tmp_path / "x", progress=False, **kwargs)


def test_missing_local_file_and_unsupported_scheme(tmp_path):
    missing = tmp_path / "nope.zip"
    with pytest.raises(PreparationError, match=re.escape(str(missing))):
        download(missing.as_uri(), tmp_path / "x", progress=False)
    with pytest.raises(PreparationError, match="unsupported URL scheme 'ftp'"):
        download("ftp://example.org/x.zip", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ loopback HTTP


class _Server(ThreadingHTTPServer):
    payload = PAYLOAD
    honour_range = True
    cut_first_response_at = None  # bytes sent before dropping the connection on the first request
    requests: list


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        first = not server.requests
        requested = self.headers.get("Range")
        server.requests.append(requested)
        if self.path != "/payload.bin":
            self.send_error(404)
            return
        data, start = server.payload, 0
        match = re.fullmatch(r"bytes=(\d+)-", requested or "")
        if match and server.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if first and server.cut_first_response_at is not None:
            body = body[: server.cut_first_response_at]  # the connection closes with the body short
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def http_server(monkeypatch):
    """A loopback-only server for PAYLOAD at /payload.bin, shut down after the test."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/payload.bin"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_interrupted_transfer_resumes_with_a_range_request(http_server, tmp_path):
    server, url = http_server
    cut = 1_234_567
    server.cut_first_response_at = cut
    destination = tmp_path / "payload.bin"
    with pytest.raises(DownloadError, match="run again to resume"):
        download(url, destination, sha256=SHA256, progress=False, timeout=10)
    assert not destination.exists()
    assert partial_of(destination).read_bytes() == PAYLOAD[:cut]  # kept for the resume

    download(url, destination, sha256=SHA256, progress=False, timeout=10)
    assert server.requests == [None, f"bytes={cut}-"]
    assert destination.read_bytes() == PAYLOAD
    assert not partial_of(destination).exists()


def test_http_server_ignoring_range_restarts_cleanly(http_server, tmp_path):
    server, url = http_server
    server.honour_range = False
    destination = tmp_path / "payload.bin"
    partial_of(destination).write_bytes(b"X" * 4096)  # must be discarded, not prepended
    download(url, destination, sha256=SHA256, progress=False, timeout=10)
    assert server.requests == ["bytes=4096-"]
    assert destination.read_bytes() == PAYLOAD


def test_http_complete_partial_is_finished_from_a_416_answer(http_server, tmp_path):
    server, url = http_server
    destination = tmp_path / "payload.bin"
    partial_of(destination).write_bytes(PAYLOAD)
    download(url, destination, sha256=SHA256, progress=False, timeout=10)
    assert server.requests == [f"bytes={len(PAYLOAD)}-"]
    assert destination.read_bytes() == PAYLOAD


def test_http_error_is_a_download_error_naming_the_url(http_server, tmp_path):
    _, url = http_server
    missing = url.replace("payload.bin", "missing.zip")
    with pytest.raises(DownloadError, match=re.escape(missing) + ": HTTP error 404"):
        download(missing, tmp_path / "missing.zip", progress=False, timeout=10)
    assert not (tmp_path / "missing.zip").exists()


# ------------------------------------------------------------------------------------------------ safe_extract


GOOD_FILES = {"top/a.txt": b"alpha", "top/sub/b.bin": bytes(range(256)) * 100, "top/empty.txt": b""}


def make_zip(path: Path, hostile: zipfile.ZipInfo = None, hostile_data: bytes = b"evil") -> Path:
    """A zip with GOOD_FILES, then (optionally) one hostile entry, so that validation must precede writing."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("top/", b"")
        for name, data in GOOD_FILES.items():
            archive.writestr(name, data)
        if hostile is not None:
            archive.writestr(hostile, hostile_data)
    return path


def zip_entry(name: str, file_type: int = stat.S_IFREG) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so the mode in external_attr is meaningful
    info.external_attr = (file_type | 0o777) << 16
    return info


def assert_extracted(destination: Path, written) -> None:
    for name, data in GOOD_FILES.items():
        assert (destination / name).read_bytes() == data
    assert sorted(written) == sorted(destination / name for name in GOOD_FILES)
    assert not [p for p in destination.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_zip_extracts_regular_files_and_folders(tmp_path):
    archive = make_zip(tmp_path / "good.zip")
    destination = tmp_path / "out"
    assert_extracted(destination, safe_extract(archive, destination, progress=False))
    # Again over the existing files: overwritten in place, same result.
    assert_extracted(destination, safe_extract(archive, destination, progress=False))


@pytest.mark.parametrize(
    "entry, reason",
    [
        (zip_entry("../evil.txt"), "contains '..'"),
        (zip_entry("top/../../evil.txt"), "contains '..'"),
        (zip_entry("/tmp/seg-test-absolute-evil.txt"), "absolute path"),
        (zip_entry("C:/evil.txt"), "absolute path"),
        (zip_entry("..\\evil.txt"), "backslash"),
        (zip_entry("C:\\evil.txt"), "backslash"),
        (zip_entry("c:evil.txt"), "absolute path"),
        (zip_entry("//server/share/evil.txt"), "absolute path"),
        (zip_entry("top\\..\\..\\evil.txt"), "backslash"),
        (zip_entry("top/./../../evil.txt"), "contains '..'"),
        (zip_entry("top/link", stat.S_IFLNK), "symbolic link"),
        (zip_entry("top/tty", stat.S_IFCHR), "character device"),
        (zip_entry("top/disk", stat.S_IFBLK), "block device"),
        (zip_entry("top/pipe", stat.S_IFIFO), "FIFO"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "drive", "backslash", "drive-backslash", "drive-relative", "unc",
         "backslash-dotdot", "dot-dotdot", "symlink", "chardev", "blockdev", "fifo"],
)
def test_hostile_zip_members_are_refused_before_anything_is_written(tmp_path, entry, reason):
    archive = make_zip(tmp_path / "hostile.zip", entry, b"/etc/passwd")
    destination = tmp_path / "work" / "out"
    with pytest.raises(PreparationError) as caught:
        safe_extract(archive, destination, progress=False)
    message = str(caught.value)
    assert str(archive) in message and repr(entry.filename) in message and reason in message
    assert "nothing was extracted" in message
    assert not destination.exists()  # not even the good members that come first
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()
    assert not Path("/tmp/seg-test-absolute-evil.txt").exists()
    with pytest.raises(PreparationError):
        archive_members(archive)


def test_encrypted_zip_member_is_refused(tmp_path):
    archive = make_zip(tmp_path / "enc.zip")
    data = bytearray(archive.read_bytes())
    # Set the "encrypted" flag bit of the first local header and its central directory record.
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + flag_offset
        data[at] |= 0x01
    archive.write_bytes(bytes(data))
    with pytest.raises(PreparationError, match="encrypted; nothing was extracted"):
        safe_extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def make_tar(path: Path, hostile: tarfile.TarInfo = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in GOOD_FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if hostile is not None:
            archive.addfile(hostile, io.BytesIO(b"evil") if hostile.isreg() else None)
    return path


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


def test_tar_gz_extracts_regular_files(tmp_path):
    archive = make_tar(tmp_path / "good.tar.gz")
    destination = tmp_path / "out"
    assert_extracted(destination, safe_extract(archive, destination, progress=False))


@pytest.mark.parametrize(
    "entry, reason",
    [
        (tar_entry("../evil.txt"), "contains '..'"),
        (tar_entry("/tmp/seg-test-absolute-evil.txt"), "absolute path"),
        (tar_entry("top/link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (tar_entry("top/hard", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
        (tar_entry("top/tty", tarfile.CHRTYPE), "device file"),
        (tar_entry("top/pipe", tarfile.FIFOTYPE), "FIFO"),
        (tar_entry("top/disk", tarfile.BLKTYPE), "device file"),
        (tar_entry("top/./../../evil.txt"), "contains '..'"),
        (tar_entry("top/relative-link", tarfile.SYMTYPE, "../../evil.txt"), "symbolic link"),
        # A hard link to a member of the same archive is still refused: extraction would share its inode.
        (tar_entry("top/hard-inside", tarfile.LNKTYPE, "top/a.txt"), "hard link"),
        (tar_entry("C:/evil.txt"), "absolute path"),
        # Longer than ustar's 100-character name field, so the name travels in an extended header.
        (tar_entry("top/" + "d" * 120 + "/../../../evil.txt"), "contains '..'"),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "chardev", "fifo", "blockdev", "dot-dotdot", "relative-symlink",
         "hardlink-inside", "drive", "long-name-dotdot"],
)
def test_hostile_tar_members_are_refused_before_anything_is_written(tmp_path, entry, reason):
    archive = make_tar(tmp_path / "hostile.tar.gz", entry)
    destination = tmp_path / "work" / "out"
    with pytest.raises(PreparationError) as caught:
        safe_extract(archive, destination, progress=False)
    message = str(caught.value)
    assert str(archive) in message and repr(entry.name) in message and reason in message
    assert not destination.exists()
    assert not (tmp_path / "evil.txt").exists()


def test_not_an_archive_and_corrupt_member(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an archive")
    with pytest.raises(PreparationError, match=re.escape(f"{text}: not a zip or tar archive")):
        safe_extract(text, tmp_path / "out", progress=False)
    with pytest.raises(PreparationError, match="no such file"):
        safe_extract(tmp_path / "missing.zip", tmp_path / "out", progress=False)

    archive = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
        bundle.writestr("top/data.bin", b"A" * 10000)
    data = bytearray(archive.read_bytes())
    data[data.index(b"A" * 100) + 50] = ord("B")  # the stored CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(PreparationError, match=r"member 'top/data.bin' is corrupt .*download the archive again"):
        safe_extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "top" / "data.bin").exists()  # the bad file never got its final name
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_tar_pax_header_renaming_a_member_outside_is_refused(tmp_path):
    # The member's ustar name is harmless; its PAX "path" record, which readers honour, climbs out.
    archive = tmp_path / "pax.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as bundle:
        info = tarfile.TarInfo("top/innocent.txt")
        info.size = 4
        info.pax_headers = {"path": "../evil.txt"}
        bundle.addfile(info, io.BytesIO(b"evil"))
    destination = tmp_path / "work" / "out"
    with pytest.raises(PreparationError, match=r"'\.\./evil\.txt'.*contains '\.\.'"):
        safe_extract(archive, destination, progress=False)
    assert not destination.exists()
    assert not (tmp_path / "work" / "evil.txt").exists()


def _tar_with(path: Path, entries) -> Path:
    """A tar of (TarInfo, data or None) in order."""
    with tarfile.open(path, "w") as bundle:
        for info, data in entries:
            bundle.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_a_symlink_then_a_file_written_through_it_is_refused(tmp_path):
    # The classic two-step escape: "top/link" -> a folder outside, then "top/link/evil.txt" lands in that folder.
    outside = tmp_path / "outside"
    outside.mkdir()
    payload = b"evil"
    through = tarfile.TarInfo("top/link/evil.txt")
    through.size = len(payload)
    tar = _tar_with(tmp_path / "two-step.tar",
                    [(tar_entry("top/link", tarfile.SYMTYPE, str(outside)), None), (through, payload)])

    zipped = tmp_path / "two-step.zip"
    with zipfile.ZipFile(zipped, "w") as bundle:
        bundle.writestr(zip_entry("top/link", stat.S_IFLNK), str(outside))
        bundle.writestr("top/link/evil.txt", payload)

    for archive in (tar, zipped):
        destination = tmp_path / f"out-{archive.suffix[1:]}"
        with pytest.raises(PreparationError, match=r"'top/link'.*symbolic link.*nothing was extracted"):
            safe_extract(archive, destination, progress=False)
        assert not destination.exists()
        assert list(outside.iterdir()) == []


def test_an_existing_symlink_at_a_member_path_is_replaced_not_written_through(tmp_path):
    # A link left in the destination (by an earlier hostile run, say) must not redirect the write elsewhere.
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"original")
    destination = tmp_path / "out"
    (destination / "top").mkdir(parents=True)
    (destination / "top" / "a.txt").symlink_to(victim)
    written = safe_extract(make_zip(tmp_path / "good.zip"), destination, progress=False)
    assert victim.read_bytes() == b"original"
    assert not (destination / "top" / "a.txt").is_symlink()
    assert_extracted(destination, written)


def test_members_never_get_the_archive_permission_bits(tmp_path):
    # setuid/setgid/world-writable bits from a hostile archive are not applied (the umask decides).
    info = tarfile.TarInfo("top/tool")
    info.size = 4
    info.mode = 0o6777
    archive = _tar_with(tmp_path / "modes.tar", [(info, b"#!/x")])
    (written,) = safe_extract(archive, tmp_path / "out", progress=False)
    mode = stat.S_IMODE(written.stat().st_mode)
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH), oct(mode)
