"""Parity of corruptions.py with the reference `imagecorruptions` package on the deterministic corruptions.

Two steps, because the reference fails on NumPy 2 and is not a dependency of ours: in a scratch environment that
has it (Python 3.11, numpy<2, scikit-image<0.23, scipy<1.12, imagecorruptions 1.1.2), write its outputs, then
compare in ours:

/tmp/refvenv/bin/python bench/corruption_parity.py --write-reference /tmp/reference.npz --images data/synthetic/query
.venv/bin/python bench/corruption_parity.py --reference /tmp/reference.npz --markdown runs/bench/parity.md

Gaussian blur's call of skimage's `gaussian` is given its renamed argument (`multichannel` → `channel_axis`),
without which the reference fails on scikit-image >= 0.19.
The reference is called as CIL-ReID calls it: on the PIL image at its stored size, the result cast with np.uint8.
Printed: the mean absolute difference in grey levels (0–255) per corruption × severity, and the largest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DETERMINISTIC = ("brightness", "contrast", "saturate", "pixelate", "jpeg_compression", "defocus_blur", "zoom_blur",
                 "gaussian_blur")
SEVERITIES = (1, 2, 3, 4, 5)


def test_images(folder: Path, count: int) -> list[np.ndarray]:
    """The first `count` .jpg images of a folder, sorted by name, as uint8 RGB arrays."""
    paths = sorted(folder.glob("*.jpg"))[:count]
    if not paths:
        sys.exit(f"--images {folder}: no .jpg images there")
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def write_reference(images: list[np.ndarray], out: Path) -> None:
    """Run the reference on every image × deterministic corruption × severity and store inputs and outputs."""
    from imagecorruptions import corruptions as reference  # only in the scratch environment
    from skimage.filters import gaussian

    def renamed_gaussian(image, sigma, multichannel=False, **options):
        """skimage >= 0.19 calls the reference's `multichannel=True` `channel_axis=-1`; nothing else differs."""
        return gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **options)

    reference.gaussian = renamed_gaussian
    outputs = {f"{name}/{s}": np.stack([np.uint8(getattr(reference, name)(Image.fromarray(image), severity=s))
                                        for image in images])
               for name in DETERMINISTIC for s in SEVERITIES}
    np.savez_compressed(out, images=np.stack(images), **outputs)
    print(f"reference outputs of {len(images)} images in {out}")


def parity_table(reference: dict[str, np.ndarray]) -> list[tuple[str, list[float], float]]:
    """Per corruption: the mean absolute difference to the reference at each severity, and the largest pixel one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from corruptions import corrupt

    rows = []
    for name in DETERMINISTIC:
        means, worst = [], 0.0
        for s in SEVERITIES:
            ours = np.stack([corrupt(image, name, s, seed=0) for image in reference["images"]]).astype(np.float64)
            diff = np.abs(ours - reference[f"{name}/{s}"])
            means.append(float(diff.mean()))
            worst = max(worst, float(diff.max()))
        rows.append((name, means, worst))
    return rows


def markdown(rows: list[tuple[str, list[float], float]], count: int) -> str:
    """The parity table in markdown."""
    lines = [f"Mean absolute difference to imagecorruptions 1.1.2, grey levels, {count} images of 128×64",
             "", "| corruption | s1 | s2 | s3 | s4 | s5 | largest pixel difference |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{m:.2f}" for m in means) + f" | {worst:.0f} |"
              for name, means, worst in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path("data/synthetic/query"))
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--write-reference", type=Path, help="in the scratch environment: write reference outputs")
    parser.add_argument("--reference", type=Path, help="in ours: compare with these reference outputs")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.write_reference is not None:
        write_reference(test_images(args.images, args.count), args.write_reference)
        return
    if args.reference is None:
        parser.error("give --write-reference OUT.npz (scratch environment) or --reference OUT.npz (ours)")
    with np.load(args.reference) as stored:
        reference = {key: stored[key] for key in stored.files}
    table = markdown(parity_table(reference), len(reference["images"]))
    print(table)
    if args.markdown is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from utils import atomic_write_bytes

        atomic_write_bytes(args.markdown, table.encode())


if __name__ == "__main__":
    main()
