"""Images served from the gateway's own store or a registered campaign's images folder (never
fetched from a caller's URL), and mask overlays rendered from the RLE.

A campaign in the campaign registry (issue #16) has its images in its own folder
(``images_root``), named in the detector's events relative to the shared image volume
(``MASKPROP_IMAGE_ROOT``, the gateway's ``image_root``) when the folder lies under it and
add-images ran with the same setting, else relative to the folder itself; either way the file
must resolve inside the campaign's folder (hidden gold of such a campaign lives there too).
Other campaigns (``feed-simulated`` pools) keep the gateway's store,
``image_root/<campaign>/<file>``."""

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


def image_path(image_root: Path, campaign: str, relative: str, campaign_root: Path | None) -> Path:
    """The file of one image a question names (module docstring): under the campaign's folder
    when ``campaign_root`` is given, else in the gateway's store.  :class:`ImageMissing` when
    it leaves its root (``..``, absolute, a symlink out) or is not a file."""
    if campaign_root is None:
        return safe_path(image_root / campaign, relative)
    folder = campaign_root.resolve()
    shared = image_root.resolve()
    bases = [shared, folder] if folder.is_relative_to(shared) else [folder]
    for base in bases:
        path = resolve_under(base, relative)
        # under the shared volume, but maybe another campaign's: only this folder counts
        if path is not None and path.is_relative_to(folder) and path.is_file():
            return path
    raise ImageMissing(relative)


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
