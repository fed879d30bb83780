"""Every image mode decodes the same way; broken files fail with a reason, never a crash."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from visionpipe.errors import ImageReadError
from visionpipe.images import check_images, read_image


def rgb(h=24, w=40) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (200, 10, 10)
    a[:, w // 2:] = (10, 10, 200)
    return a


def test_rgb_png_roundtrip(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(rgb()).save(p)
    out = read_image(p)
    assert out.shape == (24, 40, 3) and out.dtype == np.uint8
    assert np.array_equal(out, rgb())


def test_grayscale_becomes_three_channels(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.full((16, 16), 77, np.uint8), mode="L").save(p)
    out = read_image(p)
    assert out.shape == (16, 16, 3) and (out == 77).all()


def test_rgba_alpha_is_composited(tmp_path):
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0] = 255
    a[:8, :, 3] = 255  # top half opaque red, bottom transparent
    p = tmp_path / "t.png"
    Image.fromarray(a, mode="RGBA").save(p)
    out = read_image(p)
    assert out.shape == (16, 16, 3)
    assert (out[:8, :, 0] == 255).all() and (out[8:] == 0).all()


def test_16bit_is_scaled_to_8bit(tmp_path):
    a = np.full((16, 16), 65535, np.uint16)
    a[:8] = 32768
    p = tmp_path / "d.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    out = read_image(p)
    assert out.shape == (16, 16, 3)
    assert out[8:, :, 0].min() == 255 and 126 <= out[0, 0, 0] <= 129


def test_exif_orientation_is_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.fromarray(rgb(24, 40))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    img.save(p, exif=exif, quality=95)
    out = read_image(p)
    assert out.shape == (40, 24, 3)  # width and height swapped
    # after a clockwise turn the left (red) half is on top
    assert out[2, 12, 0] > 150 and out[-3, 12, 2] > 150


def test_palette_png(tmp_path):
    p = tmp_path / "p.png"
    Image.fromarray(rgb()).convert("P").save(p)
    assert read_image(p).shape == (24, 40, 3)


@pytest.mark.parametrize("content, reason", [
    (b"", "not a recognised image"),
    (b"this is not an image at all", "not a recognised image"),
])
def test_garbage_files_fail_with_reason(tmp_path, content, reason):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as e:
        read_image(p)
    assert e.value.path == str(p)


def test_truncated_file_fails(tmp_path):
    p = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_image(p)


def test_too_small_and_missing(tmp_path):
    p = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    with pytest.raises(ImageReadError, match="too small"):
        read_image(p)
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageReadError, match="cannot read"):
        read_image(tmp_path / "folder.png")


def test_a_file_larger_than_one_read_comes_back_whole(tmp_path):
    from visionpipe.images import _read_bytes

    data = np.random.default_rng(0).bytes((1 << 22) + 12345)  # more than one os.read
    (tmp_path / "big.bin").write_bytes(data)
    assert _read_bytes(str(tmp_path / "big.bin")) == data
    (tmp_path / "empty.bin").write_bytes(b"")
    assert _read_bytes(str(tmp_path / "empty.bin")) == b""


@pytest.mark.parametrize("reported", [100, 5000, 10**6])
def test_a_file_whose_size_changed_since_its_stat_comes_back_whole(tmp_path, monkeypatch, reported):
    """The size fstat reported is a hint: a file that grew (or shrank) since is read to its end."""
    from visionpipe.images import _read_bytes

    data = np.random.default_rng(1).bytes(5000)
    (tmp_path / "f.bin").write_bytes(data)
    real = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real(fd)[:6], reported, *real(fd)[7:])))
    assert os.fstat(0).st_size == reported
    assert _read_bytes(str(tmp_path / "f.bin")) == data


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_file_that_reports_no_size_is_read_to_its_end():
    """/proc files (like pipes and some network mounts) report size 0: read until the end, not 0 bytes."""
    from visionpipe.images import _read_bytes

    got = _read_bytes("/proc/self/status")
    assert got.startswith(b"Name:") and b"VmRSS" in got and got.endswith(b"\n")


def test_check_images_splits_good_and_bad_without_touching_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(rgb()).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    before = bad.read_bytes()
    ok, skipped = check_images([str(good), str(bad)])
    assert ok == [str(good)]
    assert [b.path for b in skipped] == [str(bad)] and skipped[0].reason
    assert bad.read_bytes() == before


def pil_reference(path) -> np.ndarray:
    """The general path by hand: PIL decode, EXIF orientation, RGB."""
    from PIL import ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def photo(h=48, w=64) -> np.ndarray:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return (ramp + rng.integers(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("name, save", [
    ("rgb.png", {}), ("grey.png", {"grey": True}), ("optimized.png", {"optimize": True}),
    ("q90.jpg", {"quality": 90}), ("444.jpg", {"quality": 75, "subsampling": 0}),
    ("progressive.jpg", {"quality": 95, "progressive": True}), ("grey.jpg", {"grey": True}),
    *[(f"exif{o}.jpg", {"orientation": o}) for o in range(1, 9)],
])
def test_fast_decoder_gives_the_same_pixels_as_pil(tmp_path, name, save):
    from visionpipe.images import _fast_decodable

    save = dict(save)
    img = Image.fromarray(photo()[..., 0] if save.pop("grey", False) else photo())
    if "orientation" in save:
        exif = img.getexif()
        exif[0x0112] = save.pop("orientation")
        save["exif"] = exif
    p = tmp_path / name
    img.save(p, **save)
    assert _fast_decodable(p.read_bytes())  # this file takes the OpenCV path...
    assert np.array_equal(read_image(p), pil_reference(p))  # ...and gets exactly PIL's pixels


def test_unusual_files_take_the_general_path(tmp_path):
    from visionpipe.images import _fast_decodable

    cases = {"rgba.png": Image.fromarray(np.dstack([photo(), np.full((48, 64), 128, np.uint8)]), mode="RGBA"),
             "palette.png": Image.fromarray(photo()).convert("P"),
             "cmyk.jpg": Image.fromarray(photo()).convert("CMYK"),
             "deep.png": Image.fromarray(photo()[..., 0].astype(np.uint16) * 257)}
    for name, img in cases.items():
        img.save(tmp_path / name)
        assert not _fast_decodable((tmp_path / name).read_bytes()), name
    Image.fromarray(photo()).save(tmp_path / "keyed.png", transparency=(0, 0, 0))  # RGB with a tRNS colour key
    assert not _fast_decodable((tmp_path / "keyed.png").read_bytes())
    for name in [*cases, "keyed.png"]:
        assert read_image(tmp_path / name).shape == (48, 64, 3), name
    trunc = tmp_path / "trunc.jpg"
    Image.fromarray(photo()).save(trunc, quality=90)
    trunc.write_bytes(trunc.read_bytes()[:-200])
    assert not _fast_decodable(trunc.read_bytes())
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_image(trunc)


def _corrupt_scan(data: bytes, fill: bytes) -> bytes:
    """``data`` with 64 bytes in the middle of its entropy-coded scan overwritten by ``fill``; SOI/EOI kept."""
    out = bytearray(data)
    mid = len(out) // 2
    out[mid:mid + 64] = (fill * 64)[:64]
    assert out[:2] == b"\xff\xd8" and out[-2:] == b"\xff\xd9"
    return bytes(out)


def test_a_corrupt_jpeg_scan_fails_on_the_fast_path_as_in_pil(tmp_path):
    from visionpipe.images import _fast_decodable

    good = tmp_path / "good.jpg"
    Image.fromarray(photo(96, 128)).save(good, quality=90)
    data = good.read_bytes()
    # a marker byte where pixels should be: libjpeg fails (OpenCV only warned and returned garbage)
    mid = data.index(b"\xff\x00", len(data) // 2)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data[:mid + 1] + b"\x55" * 64 + data[mid + 65:])
    assert _fast_decodable(bad.read_bytes())  # the header looks fine: it takes the fast path
    with pytest.raises(OSError):
        pil_reference(bad)
    with pytest.raises(ImageReadError, match="cannot decode") as e:
        read_image(bad)
    assert e.value.path == str(bad)
    assert check_images([str(good), str(bad)])[0] == [str(good)]
    # random damage: read_image rejects exactly what PIL rejects, and gives PIL's pixels for the rest
    rng = np.random.default_rng(0)
    rejected = 0
    for i in range(24):
        p = tmp_path / f"r{i}.jpg"
        p.write_bytes(_corrupt_scan(data, rng.integers(0, 256, 64, dtype=np.uint8).tobytes()))
        try:
            ref = pil_reference(p)
        except OSError:
            rejected += 1
            with pytest.raises(ImageReadError, match="cannot decode"):
                read_image(p)
        else:
            assert np.array_equal(read_image(p), ref)
    assert rejected >= 3  # the sweep did test rejection


def test_a_corrupt_png_fails_on_the_fast_path(tmp_path):
    from visionpipe.images import _fast_decodable

    p = tmp_path / "bad.png"
    Image.fromarray(photo()).save(p)
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = b"\x55" * 64  # inside IDAT: the chunk CRC no longer matches
    p.write_bytes(bytes(data))
    assert _fast_decodable(bytes(data))
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_image(p)


def test_16bit_scaling_depends_on_the_bit_depth_not_on_the_brightest_pixel(tmp_path):
    import cv2

    values = np.array([0, 200, 256, 1000, 25700, 32768, 65535], np.uint16)
    dim = np.tile(values, (8, 2))
    dim[dim == 65535] = 255  # the same file but for its brightest pixel: all values <= 255
    bright = np.tile(values, (8, 2))
    Image.fromarray(bright).save(tmp_path / "bright.png")
    Image.fromarray(dim).save(tmp_path / "dim.png")
    Image.fromarray(bright).save(tmp_path / "bright.tif")
    assert cv2.imwrite(str(tmp_path / "rgb16.png"), np.dstack([bright] * 3))  # 16-bit colour: Pillow gives RGB
    assert Image.open(tmp_path / "dim.png").mode.startswith("I;16")
    expect = (np.tile(values, (8, 2)) >> 8).astype(np.uint8)  # the top 8 bits, as Pillow does for 16-bit colour
    out = {name: read_image(tmp_path / name)[..., 0] for name in ("bright.png", "dim.png", "bright.tif", "rgb16.png")}
    assert np.array_equal(out["bright.png"], expect)
    assert np.array_equal(out["bright.tif"], expect) and np.array_equal(out["rgb16.png"], expect)
    keep = np.tile(values, (8, 2)) != 65535
    assert np.array_equal(out["dim.png"][keep], expect[keep]) and out["dim.png"][0, 1] == 0  # 200 -> 0, not 200


def test_float_images_are_taken_as_0_to_1(tmp_path):
    values = np.array([0.0, 0.25, 0.5, 1.0, 3.0, -1.0, np.nan], np.float32)
    Image.fromarray(np.tile(values, (8, 2))).save(tmp_path / "f.tif")
    Image.fromarray(np.tile(values[:4], (8, 2))).save(tmp_path / "f01.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    out = read_image(tmp_path / "f.tif")[0, :7, 0]
    assert out.tolist() == [0, 64, 128, 255, 255, 0, 0]  # clipped; NaN is 0
    assert read_image(tmp_path / "f01.tif")[0, :4, 0].tolist() == out[:4].tolist()  # whatever the maximum
