import io

import numpy as np
import pytest
import torch
from PIL import Image

from dfdetect.preprocessing import ImageError, PreprocessConfig, decode_image, normalize, resize_square, to_model_input


def jpeg_bytes(w=80, h=60, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG")
    return buf.getvalue()


def test_resize_square_center_crops_the_shorter_side():
    img = Image.new("RGB", (100, 50), "black")
    img.paste(Image.new("RGB", (50, 50), "white"), (25, 0))
    out = resize_square(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[16, 16].tolist() == [255, 255, 255]  # the center survives the crop


def test_decode_converts_to_rgb():
    buf = io.BytesIO()
    Image.new("L", (20, 20), 128).save(buf, "PNG")
    assert decode_image(buf.getvalue()).mode == "RGB"


def test_truncated_jpeg_is_refused_with_its_name():
    with pytest.raises(ImageError, match="upload.jpg: not a readable image"):
        decode_image(jpeg_bytes()[:100], "upload.jpg")


def test_not_an_image_is_refused():
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"hello world", "x")


def test_decompression_bomb_is_refused_before_decoding():
    for side, message in [(9000, "81000000 pixels exceeds the limit"), (12000, "refused as a decompression bomb")]:
        buf = io.BytesIO()
        Image.new("1", (side, side)).save(buf, "PNG")  # a small file that declares a huge image
        with pytest.raises(ImageError, match=f"bomb.png: .*{message}"):
            decode_image(buf.getvalue(), "bomb.png")


def test_model_input_is_normalised_with_stored_stats():
    cfg = PreprocessConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = to_model_input([Image.new("RGB", (40, 40), (255, 0, 255))], cfg)
    assert x.shape == (1, 3, 16, 16)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 1.0]))
    assert torch.equal(normalize(torch.full((1, 3, 16, 16), 255, dtype=torch.uint8), cfg), torch.ones(1, 3, 16, 16))
    # images cached larger (or smaller) than the model takes come out at its size
    assert torch.equal(normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), cfg), torch.ones(1, 3, 16, 16))


def test_config_round_trips():
    cfg = PreprocessConfig(image_size=96)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
