"""Reading an upload: the body within its byte limit, the image inside it (multipart field ``image`` or the raw
body), and its pixels within the pixel limit, judged from the header before anything is decoded.

Every problem is an :class:`UploadError` with the HTTP status that says whose fault it is and a one-line message;
no upload is ever written to disk or names a file to open.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from starlette.requests import Request

from seg.data.io import DataError, ImageTooLargeError, check_pixel_limit, decode_image, image_size

__all__ = ["UploadError", "decode_upload", "read_upload"]

# Only multipart bodies are parsed as forms: ``curl --data-binary @photo.jpg`` labels the raw image
# application/x-www-form-urlencoded, and it is the image.
FORM_TYPE = "multipart/form-data"
IMAGE_FIELD = "image"


class UploadError(Exception):
    """A request the service refuses: ``status`` (4xx) and a one-line ``message`` for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _too_large(limit: int) -> UploadError:
    return UploadError(413, f"upload is larger than the limit of {limit} bytes (--max-upload-mb)")


async def _body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit`` bytes, or from its Content-Length."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, limit: int) -> Tuple[bytes, str]:
    """(encoded image bytes, a name for messages) of the request: the multipart field ``image`` (its file name),
    or the raw body ("upload")."""
    body = await _body(request, limit)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        return body, "upload"

    async def replay() -> dict:  # the form parser reads the body that was already read, within the limit
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as error:  # noqa: BLE001 - the parser's errors (bad boundary, ...) are the client's
        raise UploadError(400, f"malformed {content_type} body ({error})") from None
    try:
        part = form.get(IMAGE_FIELD)
        if part is None or isinstance(part, str):
            fields = ", ".join(sorted(form.keys())) or "none"
            raise UploadError(400, f"the form has no file field {IMAGE_FIELD!r} (fields: {fields}); send the image "
                                   f"as -F {IMAGE_FIELD}=@photo.jpg or as the raw body")
        return await part.read(), part.filename or IMAGE_FIELD
    finally:
        await form.close()


def decode_upload(data: bytes, name: str, max_pixels: Optional[int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an upload: 400 empty or truncated/corrupt, 415 not an image, 413 above
    ``max_pixels`` (from the header, before decoding)."""
    if not data:
        raise UploadError(400, f"{name}: empty upload (0 bytes); expected an image such as PNG or JPEG")
    try:
        header = image_size(data, name, max_pixels)
        rgb = decode_image(data, name, max_pixels=None)  # the header was checked just above
        if header is None:  # a format only OpenCV parses: its size is known once decoded
            check_pixel_limit(name, rgb.shape[1], rgb.shape[0], max_pixels)
        return rgb
    except ImageTooLargeError as error:
        raise UploadError(413, str(error).replace("(max_pixels;", "(--max-pixels;")) from None
    except DataError:
        if header is None:
            raise UploadError(415, f"{name}: not an image (expected PNG, JPEG, WebP, BMP or TIFF)") from None
        raise UploadError(400, f"{name}: a {header[0]}x{header[1]} image that does not decode (truncated or "
                               f"corrupt)") from None
