"""Network folders and the mask store refuse what could leave their folder or is no image."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from netweave.extension.library import BadName, Library
from netweave.extension.masks import MaskError, MaskStore, Overlay


def test_names_never_leave_the_folders(tmp_path):
    loras, outside = tmp_path / "loras", tmp_path / "outside"
    loras.mkdir(), outside.mkdir()
    (loras / "sub").mkdir()
    (loras / "sub" / "ok.safetensors").write_bytes(b"x")
    (outside / "secret.safetensors").write_bytes(b"x")
    os.symlink(outside / "secret.safetensors", loras / "link.safetensors")
    lib = Library([str(loras)])
    assert lib.find("lora", "sub/ok").endswith("ok.safetensors")
    for bad in ("../outside/secret", "/etc/passwd", "sub/../../outside/secret", "a\x00b", ""):
        with pytest.raises(BadName):
            lib.find("lora", bad)
    with pytest.raises(FileNotFoundError, match="leads outside"):
        lib.find("lora", "link")
    with pytest.raises(FileNotFoundError, match="no lora named 'nope'"):
        lib.find("lora", "nope")
    assert lib.names("lora") == ["sub/ok"]  # the escaping link is not listed
    assert lib.describe("lora", "sub/ok")["error"]  # not a safetensors file: said, not raised


def png(a, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(a, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def test_mask_store_checks_uploads(tmp_path):
    store = MaskStore(str(tmp_path))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (255, 255, 255, 255)  # opaque white left, transparent right
    img = store.put("m", png(rgba))
    assert img.mode == "L" and img.getpixel((0, 0)) == 255 and img.getpixel((3, 0)) == 0
    assert list(store) == ["m"] and store["m"].size == (4, 4)
    with pytest.raises(MaskError, match="pixels"):
        store.put("big", png(np.zeros((4200, 4200))))
    with pytest.raises(MaskError, match="not an image"):
        store.put("junk", b"\x89PNG but not really")
    with pytest.raises(MaskError, match="valid mask name"):
        store.put("../escape", png(np.zeros((2, 2))))
    with pytest.raises(MaskError, match="built-in region"):
        store.put("Rest", png(np.zeros((2, 2))))
    assert sorted(os.listdir(tmp_path)) == ["m.png"]  # nothing half-written, nothing outside
    assert "../escape" not in store
    inline = Overlay({"m": Image.new("L", (2, 2), 7)}, store)
    assert inline["m"].getpixel((0, 0)) == 7 and set(inline) == {"m"}
    store.delete("m")
    with pytest.raises(KeyError):
        store.delete("m")


def test_mask_tools():
    from netweave.extension import mask_tools as mt
    left = np.asarray(mt.preset("left half", 10, 4))
    assert left[:, :5].min() == 255 and left[:, 5:].max() == 0
    thirds = [np.asarray(mt.preset(n, 9, 3)) for n in ("left third", "middle third", "right third")]
    assert (sum(t.astype(int) for t in thirds) == 255).all()  # they tile the image once
    quarters = [np.asarray(mt.preset(n, 8, 8)) for n in mt.PRESETS if n.endswith("quarter")]
    assert (sum(q.astype(int) for q in quarters) == 255).all()
    centre = np.asarray(mt.preset("centre", 8, 8))
    assert centre[2:6, 2:6].min() == 255 and centre.sum() == 16 * 255
    with pytest.raises(ValueError, match="no preset"):
        mt.preset("diagonal")
    assert (np.asarray(mt.invert(Image.fromarray(left))) == 255 - left).all()
    soft = np.asarray(mt.feather(mt.preset("left half", 64, 8), 4))
    assert 0 < soft[4, 32] < 255 and soft[4, 0] > 250 and soft[4, 63] < 5
    layer = Image.new("RGBA", (6, 6), (0, 0, 0, 0))
    layer.putpixel((1, 2), (255, 0, 0, 255))
    drawn = mt.from_drawing({"background": None, "layers": [layer], "composite": None})
    assert drawn.getpixel((1, 2)) == 255 and np.asarray(drawn).sum() == 255
    assert mt.from_drawing({"layers": [Image.new("RGBA", (6, 6))]}) is None
    assert mt.from_drawing(None) is None
    preview = mt.overlay(Image.fromarray(left), Image.new("RGB", (20, 8), (0, 0, 255)))
    assert preview.size == (20, 8) and preview.getpixel((0, 0)) != preview.getpixel((19, 0))


def bomb(width, height, bit_depth=1) -> bytes:
    """A real decompression bomb: a valid grayscale PNG of width × height zero pixels whose
    rows compress about 1000:1 (40000² at 1 bit is 200 MB decoded from ~200 KB)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)  # filter byte + the row
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.parametrize("width, height, words", [
    (40000, 40000, "broken image|pixels"),  # past PIL's own bomb limit
    (12000, 12000, "pixels"),  # under PIL's limit, over the store's
    (4097, 4096, "pixels"),
])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, width, height, words):
    data = bomb(width, height)
    assert len(data) < 16 * 2 ** 20 and width * height > 4096 * 4096
    store = MaskStore(str(tmp_path))
    before = rss_mib()
    with pytest.raises(MaskError, match=words):
        store.put("bomb", data)
    assert rss_mib() - before < 64  # the pixels were never decoded
    assert list(store) == []
    # the largest allowed size decodes, to 16 MiB of 8-bit gray
    assert store.put("ok", bomb(4096, 4096)).size == (4096, 4096)


def test_a_mask_that_is_not_bytes_or_text_is_refused(tmp_path):
    """Found by tests/fuzz.py: {"image": 3} through the API was a 500."""
    store = MaskStore(str(tmp_path))
    for junk in (3, None, [1, 2], {"a": 1}):
        with pytest.raises(MaskError, match="expected PNG bytes or base64 text"):
            store.put("m", junk)
