"""`--pixels zstd` members (sslfw/data/zpix.py): pixel-identical to the source at any size, and a window of rows
reads and decompresses only its blocks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from sslfw.data import zpix
from sslfw.data.images import to_rgb8
from sslfw.data.reader import decode_crop
from sslfw.data.shards import check_image


@pytest.mark.parametrize("shape", [(1, 1, 3), (31, 7, 3), (32, 5, 3), (33, 64, 3), (97, 45, 3), (384, 512, 3)])
def test_round_trip_and_every_window_of_rows_at_odd_sizes(shape):
    a = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    member = zpix.encode(a)
    assert np.array_equal(zpix.decode(member), a)
    head = zpix.header(member[:64])
    for y, count in [(0, 1), (0, shape[0]), (shape[0] - 1, 1), (shape[0] // 3, max(1, shape[0] // 2))]:
        count = min(count, shape[0] - y)
        reads: list[int] = []

        def read(offset: int, size: int, reads: list[int] = reads) -> bytes:
            reads.append(size)
            return member[offset : offset + size]

        assert np.array_equal(zpix.read_rows(read, head, y, count), a[y : y + count])
        blocks = (y + count - 1) // zpix.BLOCK_ROWS - y // zpix.BLOCK_ROWS + 1
        assert len(reads) == 2 and (blocks == head[4] or sum(reads) < len(member))  # offsets, then only its blocks


def test_photos_16_bit_palette_and_cmyk_files_decode_to_the_pixels_pillow_gives(tmp_path):
    files = {}
    for name in ("astronaut", "chelsea", "coffee"):
        files[name] = Image.fromarray(getattr(photos, name)())
    gray16 = (photos.camera().astype(np.uint16) * 257)[:100, :130]
    files["gray16"] = Image.fromarray(gray16)
    files["palette"] = files["chelsea"].convert("P", palette=Image.ADAPTIVE, colors=64)
    files["cmyk"] = files["coffee"].convert("CMYK")
    for name, im in files.items():
        path = tmp_path / f"{name}.{'jpg' if name == 'cmyk' else 'png'}"
        im.save(path)
        member, ext, err = check_image(str(path), None, "zstd")
        assert err == "" and ext == "zpx", err
        with Image.open(path) as src:
            want = np.asarray(to_rgb8(src))  # what the loader decodes from the original file
        assert np.array_equal(zpix.decode(member), want), name
        original, _, _ = check_image(str(path), None, "original")
        rng = [np.random.default_rng(3) for _ in range(2)]
        assert np.array_equal(decode_crop(member, (40, 40), rng[0]), decode_crop(original, (40, 40), rng[1]))


def test_on_photos_it_is_smaller_than_raw_and_refuses_what_is_not_pixels():
    a = photos.astronaut()
    png = io.BytesIO()
    Image.fromarray(a).save(png, format="PNG")
    member = zpix.encode(a)
    assert len(member) < 0.9 * a.nbytes and len(member) < 1.6 * len(png.getvalue())
    with pytest.raises(ValueError, match="uint8"):
        zpix.encode(a.astype(np.float32))
    assert zpix.header(png.getvalue()[:64]) is None
