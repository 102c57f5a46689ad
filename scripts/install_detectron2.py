"""Install detectron2 v0.6 as pure Python into the running interpreter (bootstrap extra
``detectron2``).

detectron2 has no wheel for this Python/torch.  PyPI's ``pb1-detectron2==0.6`` is an sdist of
upstream v0.6's Python code without ``layers/csrc``; it installs after four edits (facts in
the project's field notes):

1. ``setup.py``: ``ext_modules=[]`` (no C++ sources to build) and the model-zoo configs as
   package data;
2. ``from detectron2 import _C`` wrapped in try/except in the four modules that import it
   (rotated boxes, deformable conv, rotated ROIAlign, the fast COCO eval: none is used by
   PointRend);
3. ``Image.LINEAR`` -> ``Image.BILINEAR`` (removed in Pillow 10);
4. ``pkg_resources`` -> ``importlib.resources`` (setuptools 81+ has none).

Steps: fetch the sdist into ``.cache/detectron2/`` (pinned URL), refuse it unless its sha256 is
the pinned one, unpack it into a fresh folder, apply the edits (each must match exactly once,
so a different sdist fails loudly instead of installing half-patched), then
``pip install --no-build-isolation --no-deps``.  ``pip download`` cannot fetch it: pip 26
refuses any index distribution whose metadata names a direct-URL dependency (this sdist's
``all`` extra does), even with ``--no-deps``.  Idempotent: a no-op when the patched
distribution is already installed.  Its runtime dependencies come from the project's
``detectron2`` extra (pyproject.toml).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

NAME = "pb1-detectron2"
VERSION = "0.6"
URL = (
    "https://files.pythonhosted.org/packages/60/26/"
    "48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
)
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "detectron2"
# Written into the installed package by edit 1, read to tell our patched install apart.
MARKER = "maskprop-patched-1"

_C_IMPORT = "from detectron2 import _C\n"
_C_GUARDED = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:  # maskprop: installed without the C++ ops (PointRend needs none)\n"
    "    _C = None\n"
)
# (file, old, new): each old text must occur exactly once.
EDITS: list[tuple[str, str, str]] = [
    ("setup.py", "    ext_modules=get_extensions(),\n", "    ext_modules=[],\n"),
    (
        "setup.py",
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    ),
    ("detectron2/layers/rotated_boxes.py", _C_IMPORT, _C_GUARDED),
    ("detectron2/layers/deform_conv.py", _C_IMPORT, _C_GUARDED),
    ("detectron2/layers/roi_align_rotated.py", _C_IMPORT, _C_GUARDED),
    ("detectron2/evaluation/fast_eval_api.py", _C_IMPORT, _C_GUARDED),
    (
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR,",
        "interp=Image.BILINEAR,",
    ),
    ("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "import importlib.resources\n"),
    (
        "detectron2/model_zoo/model_zoo.py",
        "    cfg_file = pkg_resources.resource_filename(\n"
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        "    )\n",
        "    cfg_file = str(\n"
        '        importlib.resources.files("detectron2.model_zoo")'
        '.joinpath("configs", config_path)\n'
        "    )\n",
    ),
    (
        "detectron2/__init__.py",
        '__version__ = "0.6"\n',
        f'__version__ = "0.6"\nMASKPROP_PATCH = "{MARKER}"\n',
    ),
]


def installed() -> bool:
    """True when our patched pb1-detectron2 0.6 is importable here."""
    try:
        if importlib.metadata.version(NAME) != VERSION:
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    probe = "import detectron2; print(getattr(detectron2, 'MASKPROP_PATCH', ''))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == MARKER


def fetch() -> Path:
    """The verified sdist in the cache (downloaded once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"{NAME}-{VERSION}.tar.gz"
    if not sdist.exists() or _sha256(sdist) != SHA256:
        part = sdist.with_suffix(".part")
        with urllib.request.urlopen(URL, timeout=120) as r, part.open("wb") as f:
            shutil.copyfileobj(r, f)
        part.replace(sdist)
    digest = _sha256(sdist)
    if digest != SHA256:
        sdist.unlink()
        raise SystemExit(f"{sdist.name}: sha256 {digest} is not the pinned {SHA256}; refused")
    return sdist


def unpack_and_patch(sdist: Path) -> Path:
    """A fresh patched source tree under the cache."""
    dest = CACHE / "src"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")  # "data": no links or paths leaving dest
    (tree,) = [p for p in dest.iterdir() if p.is_dir()]
    for rel, old, new in EDITS:
        path = tree / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"patch does not fit {rel}: expected one {old.strip()!r}")
        path.write_text(text.replace(old, new))
    return tree


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    if installed():
        print(f"{NAME} {VERSION} (patched) already installed")
        return
    tree = unpack_and_patch(fetch())
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-build-isolation", "--no-deps", str(tree)],
        check=True,
    )  # fmt: skip
    if not installed():
        raise SystemExit(f"{NAME} installed but `import detectron2` fails")
    print(f"{NAME} {VERSION} installed (patched, pure Python)")


if __name__ == "__main__":
    main()
