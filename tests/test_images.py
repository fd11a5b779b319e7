"""Decoding real photos: EXIF orientation, draft decoding of big JPEGs, one-line errors on bad files."""
import numpy as np
import pytest
from PIL import Image, ImageOps

from convlad.images import ImageError, _turbo_decode, list_images, load_image, load_warped

from .conftest import SAMPLES, need


@pytest.fixture(scope="module")
def holiday_photo():
    return need(SAMPLES / "holidays") / "100000.jpg"  # 2448×3264 original camera JPEG


def test_exif_orientation_is_applied(tmp_path, holiday_photo):
    im = Image.open(holiday_photo)
    im.thumbnail((400, 400))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    im.save(tmp_path / "plain.jpg", quality=95)
    plain, rotated = load_image(tmp_path / "plain.jpg"), load_image(tmp_path / "rot.jpg")
    assert rotated.size == plain.size[::-1]
    want = np.asarray(plain.transpose(Image.Transpose.ROTATE_270), dtype=np.float32)
    assert np.abs(np.asarray(rotated, dtype=np.float32) - want).mean() < 2.0


def test_big_jpeg_decoded_at_reduced_size(holiday_photo):
    full = load_image(holiday_photo)
    small = load_image(holiday_photo, min_size=448)
    assert full.size == (2448, 3264)
    # draft scales by 1/2, 1/4 or 1/8 keeping both sides >= 448: 2448/4 = 612
    assert small.size == (612, 816)
    a = np.asarray(full.resize((224, 224), Image.BILINEAR, reducing_gap=3.0), dtype=np.float32)
    b = np.asarray(small.resize((224, 224), Image.BILINEAR, reducing_gap=3.0), dtype=np.float32)
    assert np.abs(a - b).mean() < 3.0  # same picture once warped to the network's input


def _pillow_decode(path, min_size=None):
    with Image.open(path) as im:
        if min_size:
            w, h = im.size
            s = min(w, h) // min_size
            im.draft("RGB", (w // s, h // s))
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def test_jpeg_decode_gives_pillows_pixels(tmp_path, holiday_photo):
    """The libjpeg-turbo fast path must not change a descriptor: same pixels as Pillow's decoder, EXIF
    orientation kept; CMYK falls back to Pillow."""
    small = Image.open(holiday_photo).resize((600, 450))
    small.convert("L").save(tmp_path / "gray.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 8
    small.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=90)
    small.convert("CMYK").save(tmp_path / "cmyk.jpg")
    cases = [(holiday_photo, m) for m in (None, 224, 448)] + [
        (tmp_path / f, m) for f in ("gray.jpg", "rotated.jpg", "cmyk.jpg") for m in (None, 224)]
    for path, min_size in cases:
        got = np.asarray(load_image(path, min_size=min_size))
        want = _pillow_decode(path, min_size)
        assert got.shape == want.shape and np.array_equal(got, want), (path.name, min_size)
    for name, fast in (("gray.jpg", True), ("rotated.jpg", True), ("cmyk.jpg", False)):
        with Image.open(tmp_path / name) as im:
            assert (_turbo_decode(tmp_path / name, im) is not None) == fast, name
    with Image.open(holiday_photo) as im:
        im.draft("RGB", (306, 408))
        assert _turbo_decode(holiday_photo, im).size == (306, 408)


def test_warp_sizes(holiday_photo):
    a1, a2 = load_warped(holiday_photo, [224, 448])
    assert a1.shape == (224, 224, 3) and a2.shape == (448, 448, 3) and a1.dtype == np.uint8


def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, holiday_photo):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is a text file, not a photo\n")
    data = holiday_photo.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbled.jpg").write_bytes(data[:2000] + bytes(200_000) + data[-1000:])
    for name, reason in [("empty.jpg", "empty"), ("notes.jpg", "not an image"),
                         ("truncated.jpg", "cannot decode"), ("garbled.jpg", "")]:
        path = tmp_path / name
        try:
            load_image(path, min_size=224)
        except ImageError as e:
            assert str(path) in str(e) and reason in str(e) and "\n" not in str(e)
        else:
            pytest.fail(f"{name} decoded without error")
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.jpg")


def test_list_images_recursive_sorted_skips_hidden_and_non_images(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".cache").mkdir()
    for p in ["a.JPG", "b/c.png", "b/d.txt", ".hidden.jpg", ".cache/e.jpg", "f.jpeg"]:
        (tmp_path / p).write_bytes(b"x")
    assert list_images(tmp_path) == ["a.JPG", "b/c.png", "f.jpeg"]


def test_keep_aspect_size_keeps_area_and_proportions():
    from convlad.images import keep_aspect_size

    for w, h in [(640, 480), (480, 640), (2448, 3264), (1000, 1000), (1600, 400)]:
        tw, th = keep_aspect_size(w, h, 448)
        assert tw % 16 == 0 and th % 16 == 0
        assert abs(tw * th / 448**2 - 1) < 0.1
        assert abs((tw / th) / (w / h) - 1) < 0.1
