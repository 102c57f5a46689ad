"""Images served from the gateway's own store (never fetched from a caller's URL) and mask
overlays rendered from the RLE."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from maskprop.data import coco
from maskprop_runtime.files import resolve_under


class ImageMissing(Exception):
    pass


def safe_path(root: Path, relative: str) -> Path:
    """``root / relative`` only if it stays inside ``root`` (no traversal, no absolute)."""
    candidate = resolve_under(root, relative)
    if candidate is None or not candidate.is_file():
        raise ImageMissing(relative)
    return candidate


def overlay_png(
    h: int, w: int, counts: bytes, rgba: tuple[int, int, int, int] = (255, 40, 40, 110)
) -> bytes:
    """A transparent PNG with the mask filled and its outline drawn, for stacking on the image."""
    m = coco.decode_rle(h, w, counts)
    out = np.zeros((h, w, 4), dtype=np.uint8)
    out[m] = rgba
    edge = m & ~(
        np.pad(m, 1)[2:, 1:-1]
        & np.pad(m, 1)[:-2, 1:-1]
        & np.pad(m, 1)[1:-1, 2:]
        & np.pad(m, 1)[1:-1, :-2]
    )
    out[edge] = (255, 255, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(out, "RGBA").save(buf, format="PNG")
    return buf.getvalue()
