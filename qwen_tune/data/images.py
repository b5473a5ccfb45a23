"""Image references in conversations: where one points, whether it is a readable image, its pixels and its digest.

A reference is a local path (a relative one starts at the data file's directory, so a dataset moves with its images),
a `file://` URI, or a `data:image/...;base64,...` URI. Nothing is downloaded: a URL is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
DATA_URI = re.compile(r"data:image/[^;,]+(?:;[^;,]+)*;base64,")
EXPECTED = "expected an image's local path or a data:image/...;base64,... URI"
ORIENTATION = 0x0112  # the EXIF tag; values 5-8 turn the picture by 90 degrees


class ImageError(ValueError):
    """A reference that names no readable image; the message says why, the caller says where."""


def resolve_image(ref, base_dir: str | os.PathLike) -> str:
    """The reference as messages keep it, checked to be a readable image: an absolute path (a relative one joined to
    `base_dir`, a `file://` URI made a path) or a data URI as given. Raises ImageError saying what is wrong."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError(EXPECTED)
    if ref.startswith("data:"):
        _check(io.BytesIO(_decode(ref)), "the data URI")
        return ref
    path = ref
    if ref.startswith("file:"):
        uri = urlparse(ref)
        if uri.netloc not in ("", "localhost"):
            raise ImageError(f'a file URI on the host "{uri.netloc}"; give a local path (file:///absolute/path)')
        path = unquote(uri.path)
    elif URL.match(ref):
        raise ImageError("nothing is downloaded; save the image and give its local path")
    full = os.path.abspath(os.path.join(base_dir, path))
    if not os.path.exists(full):
        hint = "" if os.path.isabs(path) else " (a relative path starts at the data file's directory)"
        raise ImageError(f"no such file {full}{hint}")
    try:
        with open(full, "rb") as f:
            _check(f, full)
    except OSError as e:  # a directory, no permission
        raise ImageError(f"cannot read {full} ({e.strerror})") from None
    return full


def _decode(uri: str) -> bytes:
    prefix = DATA_URI.match(uri)
    if not prefix:
        raise ImageError("a data URI not of the form data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(uri[prefix.end():], validate=True)
    except binascii.Error as e:
        raise ImageError(f"the data URI does not decode as base64 ({e})") from None


def _check(f, what: str) -> None:
    """Raise ImageError unless `f` holds a whole image. PNG's verify() reads every chunk and checks its CRC without
    decoding; in other formats (JPEG among them) verify() checks little, so they are decoded, JPEG at 1/8 scale
    (draft), which still reads the whole file: a truncated one is caught without holding a big image's pixels."""
    try:
        with Image.open(f) as img:
            png = img.format == "PNG"
            img.verify()
        if not png:
            f.seek(0)
            with Image.open(f) as img:
                img.draft(None, (1, 1))
                img.load()
    except Exception as e:  # PIL raises many kinds for a damaged file (OSError, SyntaxError, struct.error, ...)
        why = "not an image file" if isinstance(e, Image.UnidentifiedImageError) else str(e) or type(e).__name__
        raise ImageError(f"{what} is not a readable image ({why})") from None


def _open(ref: str):
    """A binary file over the image's bytes; `ref` as resolve_image returns it."""
    return io.BytesIO(_decode(ref)) if ref.startswith("data:") else open(ref, "rb")


def load_image(ref: str) -> Image.Image:
    """The pixels in RGB, turned upright as the EXIF orientation says (as transformers' load_image does: the model
    sees what a viewer shows). `ref` as resolve_image returns it."""
    with _open(ref) as f, Image.open(f) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def image_size(ref: str) -> tuple[int, int]:
    """(width, height) as load_image's pixels will have them (EXIF rotations by 90 degrees swap them), from the header."""
    with _open(ref) as f, Image.open(f) as img:
        width, height = img.size
        return (height, width) if img.getexif().get(ORIENTATION) in (5, 6, 7, 8) else (width, height)


def image_refs(messages: list[dict]) -> list[str]:
    """The images of a conversation in the order the template writes them (message by message, block by block)."""
    return [block["image"] for m in messages if isinstance(m.get("content"), list)
            for block in m["content"] if block.get("type") == "image"]
