"""Decoding real photos: EXIF orientation, draft decoding of big JPEGs, one-line errors on bad files."""
import numpy as np
import pytest
from PIL import Image

from convlad.images import ImageError, list_images, load_image, load_warped

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
