"""One image-caption loader for every distiller: the toy generator or an image folder.

The folder follows the diffusers training-script convention (datasets' imagefolder): images
beside a `metadata.jsonl` whose lines are {"file_name": "...", "text": "..."}. Entries with
a missing or unreadable image or a missing caption are skipped and counted, never silently
trained on; a folder with no usable entry is an error.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from distillery.distill.toy.arrays import to_model_range, toy_arrays


class ToyImages(Dataset):
    def __init__(self, n: int = 60_000, cache: Path = Path(".work/toy"), stripes: bool = False):
        self.arrays = toy_arrays(n, cache, stripes=stripes)

    def __len__(self) -> int:
        return len(self.arrays["images"])

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": torch.from_numpy(to_model_range(self.arrays["images"][i : i + 1])[0]),
                "caption": str(self.arrays["captions"][i])}


class ImageCaptionFolder(Dataset):
    def __init__(self, folder: str | Path, size: int):
        self.folder, self.size = Path(folder), size
        meta = self.folder / "metadata.jsonl"
        if not meta.exists():
            raise FileNotFoundError(f"{meta} not found: an image-caption folder needs a metadata.jsonl with "
                                    '{"file_name": ..., "text": ...} per line')
        self.entries, self.skipped = [], Counter()
        for line_no, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            reason = self._check(line)
            if isinstance(reason, str):
                self.skipped[reason] += 1
            else:
                self.entries.append(reason)
        if self.skipped:
            warnings.warn(f"{folder}: skipped {sum(self.skipped.values())} of "
                          f"{len(self.entries) + sum(self.skipped.values())} entries: {dict(self.skipped)}")
        if not self.entries:
            raise ValueError(f"{folder}: no usable image-caption entries ({dict(self.skipped)})")

    def _check(self, line: str) -> tuple[Path, str] | str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return "unparseable metadata line"
        caption, name = record.get("text"), record.get("file_name")
        if not isinstance(caption, str):
            return "missing or non-text caption"
        if not isinstance(name, str) or not (self.folder / name).is_file():
            return "missing image"
        try:
            with Image.open(self.folder / name) as im:
                im.verify()
        except Exception:  # noqa: BLE001 - any decoder failure means a corrupt file
            return "corrupt image"
        return self.folder / name, caption

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        path, caption = self.entries[i]
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC))
        return {"pixel_values": torch.from_numpy(to_model_range(image[None])[0]), "caption": caption}


def image_caption_loader(source: str, size: int, batch_size: int, seed: int = 0) -> DataLoader:
    """`source` is "toy" (60k samples), "toy:N" (N samples), "toy-stripes" / "toy-stripes:N" (the same, styled)
    or a folder path; shuffled, re-iterated per epoch."""
    kind, _, count = source.partition(":")
    if kind in ("toy", "toy-stripes"):
        dataset = ToyImages(int(count) if count else 60_000, stripes=kind == "toy-stripes")
    else:
        dataset = ImageCaptionFolder(source, size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                      generator=torch.Generator().manual_seed(seed))
