"""Each dataset's `preprocess_image`: a PIL image as its eval split sees one, checked against the
dataset's own eval pipeline on the same pixels."""

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cvolution_jax import data
from cvolution_jax.data import coco, coco_transforms, digits, fashion_mnist, imagenet, shapes, synthetic


def data_config(name, **fields):
    config = data.default_config()
    config.name = name
    config.update(fields)
    return config


def test_imagenet_and_synthetic_see_a_photo_as_the_imagenet_eval_split(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    expected = imagenet.Preprocess(16)(("a.png", str(tmp_path / "a.png"), 0), None)["image"]
    for name in ("imagenet", "synthetic"):
        inputs, display = data.preprocess_image(data_config(name, image_size=16), Image.open(tmp_path / "a.png"))
        assert inputs.shape == (1, 16, 16, 3) and display.shape == (16, 16, 3) and display.dtype == np.uint8
        np.testing.assert_array_equal(inputs[0], expected)
    assert synthetic.preprocess_image is imagenet.preprocess_image


@pytest.mark.parametrize("name, top", [("digits", 16), ("fashion_mnist", 255)])
def test_grey_datasets_see_a_photo_as_their_eval_split_sees_its_images(name, top):
    """A square grey photo whose pixels are the raw extremes (0 and the top of the dataset's scale)
    gives the dataset's eval preprocessing of the same raw image, up to float rounding."""
    raw = (np.random.default_rng(1).random((10, 10)) < 0.4) * top
    photo = Image.fromarray(np.uint8(raw * 255 / top)).convert("RGB")
    config = data_config(name, image_size=14)
    inputs, display = data.preprocess_image(config, photo)
    if name == "digits":
        mean, std = digits.statistics(config.test_fraction)
        expected = digits.Preprocess(14, mean, std)((raw.astype(np.float32), 0), None)["image"]
    else:
        expected = fashion_mnist.Preprocess(14)((raw.astype(np.uint8), 0), None)["image"]
    assert inputs.shape == (1, 14, 14, 1) and display.shape == (14, 14, 3)
    np.testing.assert_allclose(inputs[0], expected, rtol=1e-5, atol=1e-5)


def test_the_central_square_of_a_wide_photo_is_what_a_grey_dataset_sees():
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 255  # the central square is white, the sides black
    inputs, display = data.preprocess_image(data_config("fashion_mnist", image_size=10), Image.fromarray(wide))
    np.testing.assert_array_equal(display, 255)
    np.testing.assert_allclose(inputs, (255 - fashion_mnist.MEAN) / fashion_mnist.STD, rtol=1e-6)


def test_detection_sees_a_photo_as_the_coco_eval_pass_without_the_padding(tmp_path):
    paths = shapes.write_shapes(tmp_path, num_train=1, num_val=1, image_size=40)
    record = coco.load_coco(**paths["val"]).records[0]
    config = ml_collections.ConfigDict({"scale": (64, 24)})  # 40x40 -> 24x24, padded to a 32x32 bucket
    example = coco_transforms.Preprocess(scale=(64, 24), buckets=((32, 32),), max_gt=8)(record, None)
    inputs, display = coco_transforms.preprocess_image(config, Image.open(record.path))
    assert inputs.shape == (1, 24, 24, 3) and display.shape == (24, 24, 3)
    np.testing.assert_array_equal(inputs[0], example["image"][:24, :24])
    assert (example["image"][24:] == 0).all()


def test_an_unknown_dataset_is_named():
    with pytest.raises(ValueError, match=r"config.data.name must be one of digits, fashion_mnist, .* for "
                                         r"classification; got 'mnist'"):
        data.preprocess_image(data_config("mnist"), Image.new("RGB", (4, 4)))
