#!/usr/bin/env python
"""Write the committed fine-tuning data of the embedded demo: ``data/tiny-demo/`` (deterministic, ~0.4 MB).

    python scripts/make_demo_data.py [--output_dir data/tiny-demo]

Two tasks on the held-out parts of the shapes domain, each a small training folder and a larger reference
folder drawn with another seed (for FID), both ``imagefolder`` layouts with a ``metadata.jsonl``:

- ``concept-*``: the ``star`` shape the base never saw, captioned with the identifier ``sks`` in place of
  the shape word ("a small red sks shape on a white background, bottom left");
- ``style-*``: the ``outlined`` style, captioned with the style word ("a large blue outlined square ...").

``drift-prompts.txt`` holds 16 captions of what the base already draws (filled circles, squares, triangles and
crosses): the evaluation's drift (how much the fine-tune changes them) is measured on those.

tests/test_demo.py checks that the committed folders equal what this script writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stella_diffusion.shapes.domain import CONCEPT_TOKEN, caption, sample_specs, write_image_folder

# folder name -> (split, number of images, seed, identifier replacing the shape word)
DEMO_FOLDERS: dict[str, tuple[str, int, int, str | None]] = {
    "concept-train": ("concept", 24, 0, CONCEPT_TOKEN),
    "concept-reference": ("concept", 256, 1, CONCEPT_TOKEN),
    "style-train": ("style", 24, 0, None),
    "style-reference": ("style", 256, 1, None),
}


DRIFT_PROMPTS = "drift-prompts.txt"


def write_demo_data(output: str | Path) -> list[Path]:
    """Every folder of :data:`DEMO_FOLDERS` and the drift prompts under ``output``; returns their paths."""
    written = [
        write_image_folder(Path(output, name), n, seed, split, token)
        for name, (split, n, seed, token) in DEMO_FOLDERS.items()
    ]
    drift = Path(output, DRIFT_PROMPTS)
    drift.write_text("".join(caption(spec) + "\n" for spec in sample_specs(16, seed=2, split="pretrain")))
    return [*written, drift]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/tiny-demo", help="where the folders are written")
    for folder in write_demo_data(parser.parse_args().output_dir):
        print(f"Wrote {folder}")


if __name__ == "__main__":
    main()
