"""The image-caption folder loader: bad entries are skipped and counted, never trained on silently."""

import json

import pytest
from PIL import Image

from distillery.distill.training.image_captions import ImageCaptionFolder, image_caption_loader


def _folder(tmp_path, entries):
    (tmp_path / "metadata.jsonl").write_text("\n".join(e if isinstance(e, str) else json.dumps(e) for e in entries))
    return tmp_path


def test_bad_entries_are_skipped_with_a_counted_warning(tmp_path):
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    folder = _folder(tmp_path, [
        {"file_name": "good.png", "text": "a red square"},
        {"file_name": "missing.png", "text": "a ghost"},
        {"file_name": "corrupt.png", "text": "a broken thing"},
        {"file_name": "good.png"},
        "{this is not json",
    ])
    with pytest.warns(UserWarning, match="skipped 4 of 5 entries") as record:
        ds = ImageCaptionFolder(folder, size=32)
    message = str(record[0].message)
    for reason in ("missing image", "corrupt image", "missing or non-text caption", "unparseable"):
        assert reason in message
    assert len(ds) == 1
    item = ds[0]
    assert item["caption"] == "a red square" and item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"][0].mean() > 0.9 and item["pixel_values"][1].mean() < -0.9  # red, in [-1, 1]


def test_folder_without_usable_entries_is_an_error(tmp_path):
    folder = _folder(tmp_path, [{"file_name": "nope.png", "text": "x"}])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable"):
        ImageCaptionFolder(folder, size=32)
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageCaptionFolder(tmp_path / "elsewhere", size=32)


def test_toy_source_through_the_same_loader():
    batch = next(iter(image_caption_loader("toy:16", size=32, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
