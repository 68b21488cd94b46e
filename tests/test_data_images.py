"""`load_image`: every common PIL mode becomes the right 8-bit RGB values; broken files give one-line BadImageErrors."""

import numpy as np
import pytest
from PIL import Image

from mnv2.data.images import BadImageError, load_image
from mnv2.errors import UserError


def rgb(path):
    im = load_image(path)
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def test_grayscale_l_and_1bit(tmp_path):
    Image.fromarray(np.array([[0, 7, 128, 255]], dtype=np.uint8), "L").save(tmp_path / "l.png")
    assert rgb(tmp_path / "l.png")[0].tolist() == [[0, 0, 0], [7, 7, 7], [128, 128, 128], [255, 255, 255]]
    Image.fromarray(np.array([[False, True]])).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert rgb(tmp_path / "b.png")[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_sixteen_bit_and_int_and_float_scaled_to_8_bit(tmp_path):
    Image.fromarray(np.array([[0, 257 * 10, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert rgb(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 10, 128, 255]  # k * 257 is k in 8 bits
    Image.new("I", (2, 1), 65535).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert rgb(tmp_path / "i.tif")[0].tolist() == [[255, 255, 255]] * 2
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert rgb(tmp_path / "f.tif")[0, :, 1].tolist() == [0, 128, 255, 255]


def test_alpha_is_composited_on_black(tmp_path):
    px = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    Image.fromarray(px, "RGBA").save(tmp_path / "rgba.png")
    assert rgb(tmp_path / "rgba.png")[0].tolist() == [[200, 100, 50], [0, 0, 0], [100, 50, 25]]
    la = np.array([[[90, 255], [90, 0], [90, 51]]], dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert rgb(tmp_path / "la.png")[0].tolist() == [[90, 90, 90], [0, 0, 0], [18, 18, 18]]


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    p.putpalette([10, 20, 30, 40, 50, 60, 250, 0, 125] + [0] * (3 * 253))
    p.save(tmp_path / "p.png")
    assert rgb(tmp_path / "p.png")[0].tolist() == [[10, 20, 30], [40, 50, 60], [250, 0, 125]]
    p.save(tmp_path / "pt.png", transparency=1)  # palette index 1 is fully transparent
    assert Image.open(tmp_path / "pt.png").info.get("transparency") is not None
    assert rgb(tmp_path / "pt.png")[0].tolist() == [[10, 20, 30], [0, 0, 0], [250, 0, 125]]


def test_cmyk(tmp_path):
    c = Image.new("CMYK", (3, 1))
    for x, value in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):
        c.putpixel((x, 0), value)
    c.save(tmp_path / "c.tif")
    assert rgb(tmp_path / "c.tif")[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]  # white, cyan, black


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = np.asarray(load_image(tmp_path / "o.jpg"))
    assert out.shape == (40, 20, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the left band is now at the top


def test_jpeg_min_size_decodes_smaller_but_not_below(tmp_path):
    Image.new("RGB", (400, 300), (10, 200, 30)).save(tmp_path / "big.jpg")
    im = load_image(tmp_path / "big.jpg", min_size=70)
    assert min(im.size) >= 70 and im.size[0] < 400  # decoded at 1/2 or 1/4 scale
    assert load_image(tmp_path / "big.jpg").size == (400, 300)


@pytest.mark.parametrize("content, what", [(None, "no such file"), (b"", "empty"), (b"hello, not an image" * 5, "junk"),
                                           ("truncated", "truncated")])
def test_bad_files_raise_one_line_error_naming_the_file(tmp_path, content, what):
    path = tmp_path / f"{what.replace(' ', '_')}.jpg"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:600])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImageError) as info:
        load_image(path)
    assert isinstance(info.value, UserError)
    assert info.value.path == str(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_error_rebuilt_from_a_dataloader_worker_message_keeps_path_and_reason():
    # PyTorch re-raises a worker's exception as exc_type("Caught ... Original Traceback ...\n<type>: <message>").
    wrapped = ("Caught BadImageError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n'
               "mnv2.data.images.BadImageError: /d/a b.jpg: unreadable image (broken data)\n")
    e = BadImageError(wrapped)
    assert (e.path, e.reason) == ("/d/a b.jpg", "broken data")
    assert str(e) == "/d/a b.jpg: unreadable image (broken data)"


@pytest.mark.parametrize("kind", ["rgba", "sixteen_bit", "exif_rotated"])
def test_a_picture_gives_the_same_rgb_as_a_file_and_as_a_pil_image(tmp_path, kind):
    """The Predictor takes files and PIL images: both go through the same conversion (alpha onto black, 16 bits
    scaled, EXIF orientation), not Pillow's convert("RGB"), which drops alpha and clips 16-bit values at 255."""
    from mnv2.deploy.preprocess import load_image as predictor_load

    rng = np.random.default_rng(0)
    if kind == "rgba":
        path = tmp_path / "a.png"
        Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8), "RGBA").save(path)
    elif kind == "sixteen_bit":
        path = tmp_path / "a.png"
        Image.fromarray(rng.integers(0, 65536, (12, 10), dtype=np.uint16)).save(path)
    else:
        path = tmp_path / "a.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # stored sideways: turn 270 degrees
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path, exif=exif, quality=95)
    from_file = np.asarray(predictor_load(path))
    with Image.open(path) as im:
        in_memory = np.asarray(predictor_load(im))
        plain = np.asarray(im.convert("RGB"))
    assert from_file.shape[-1] == 3 and np.array_equal(from_file, in_memory)
    assert not np.array_equal(from_file, plain) or from_file.shape != plain.shape  # what convert("RGB") gave differs
