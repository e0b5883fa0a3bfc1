"""Input pipelines: splits, normalisation, coverage, determinism, resumption, decode failures."""

import gzip
import io
import itertools
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from cvolution_jax import data
from cvolution_jax.data import digits, fashion_mnist, imagenet, transforms
from tests.conftest import assert_batches_equal, take

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def config(**fields):
    cfg = data.default_config()
    cfg.update(fields)
    return cfg


def eval_batches(cfg, *, batch_size, process_index=0, process_count=1, seed=0):
    split = data.create_split(
        cfg, train=False, batch_size=batch_size, seed=seed,
        process_index=process_index, process_count=process_count,
    )
    return split, list(split.dataset)


def bilinear_reference(image, size):
    """Bilinear upsampling with half-pixel centres and clamped edges, in float64."""
    coords = np.clip((np.arange(size) + 0.5) * image.shape[0] / size - 0.5, 0, image.shape[0] - 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, image.shape[0] - 1)
    w = coords - lo
    rows = image[lo] * (1 - w)[:, None] + image[hi] * w[:, None]
    return rows[:, lo] * (1 - w) + rows[:, hi] * w


# ---------------------------------------------------------------- digits: split and values


def test_digits_split_is_fixed_stratified_and_seed_independent():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, test = digits.split_indices(0.2)
    assert len(labels) == 1797 and (len(train), len(test)) == (1437, 360)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(1797))
    # Stratified: each class's test share is 20% of the class, to within one image.
    per_class_total = np.bincount(labels, minlength=10)
    per_class_test = np.bincount(labels[test], minlength=10)
    assert np.all(np.abs(per_class_test - 0.2 * per_class_total) <= 1), per_class_test

    cfg = config(name="digits", image_size=8)
    split_a, batches_a = eval_batches(cfg, batch_size=100, seed=0)
    split_b, batches_b = eval_batches(cfg, batch_size=100, seed=12345)
    assert (split_a.num_examples, split_a.num_classes, split_a.image_shape) == (360, 10, (8, 8, 1))
    assert data.create_split(cfg, train=True, batch_size=8, seed=3, process_index=0, process_count=1).num_examples == 1437
    assert_batches_equal(batches_a, batches_b)
    got = np.concatenate([b["label"] for b in batches_a])[:360]
    np.testing.assert_array_equal(got, labels[test])


def test_digits_normalisation_uses_train_split_statistics():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    train, test = digits.split_indices(0.2)
    mean, std = raw[train].mean(), raw[train].std()
    np.testing.assert_allclose(digits.statistics(0.2), (mean, std), rtol=1e-6)
    assert (round(mean, 3), round(std, 3)) == (4.886, 6.018)

    _, batches = eval_batches(config(name="digits", image_size=8), batch_size=360)
    images = batches[0]["image"][..., 0]
    np.testing.assert_allclose(images, (raw[test] - mean) / std, atol=1e-5)
    assert images.min() == pytest.approx(-mean / std, abs=1e-5)
    assert images.max() == pytest.approx((16 - mean) / std, abs=1e-5)

    # At 32x32 the images are the bilinear upsampling of the same values.
    _, batches = eval_batches(config(name="digits", image_size=32), batch_size=360)
    expected = np.stack([bilinear_reference(img, 32) for img in raw[test[:20]]])
    np.testing.assert_allclose(batches[0]["image"][:20, ..., 0], (expected - mean) / std, atol=1e-4)


def test_pad_and_random_crop_is_a_translation_over_all_offsets():
    image = np.arange(1, 65, dtype=np.float32).reshape(8, 8, 1)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        out = transforms.pad_and_random_crop(image, 2, rng)
        matches = [(t, l) for t in range(5) for l in range(5) if np.array_equal(out, padded[t:t + 8, l:l + 8])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 25


# ---------------------------------------------------------------- eval coverage across processes


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_every_example_once_with_padding_invalid(process_count):
    from sklearn.datasets import load_digits

    raw, labels = load_digits().images, load_digits().target
    _, test = digits.split_indices(0.2)
    mean, std = digits.statistics(0.2)
    cfg = config(name="digits", image_size=8)
    batch_size = 64
    per_process = -(-360 // process_count)
    num_batches = -(-per_process // batch_size)

    seen = []
    for p in range(process_count):
        split, batches = eval_batches(cfg, batch_size=batch_size, process_index=p, process_count=process_count)
        assert split.num_examples == 360
        # Same number of batches in every process, so collectives line up.
        assert len(batches) == num_batches
        valid = np.concatenate([b["valid"] for b in batches])
        label = np.concatenate([b["label"] for b in batches])
        image = np.concatenate([b["image"] for b in batches])[..., 0]
        ids = test[p::process_count]  # process p reads examples p, p + P, ... in order
        n = len(ids)
        np.testing.assert_array_equal(valid, np.r_[np.ones(n), np.zeros(len(valid) - n)])
        np.testing.assert_array_equal(label[:n], labels[ids])
        np.testing.assert_allclose(image[:n], (raw[ids] - mean) / std, atol=1e-5)
        assert np.all(image[n:] == 0) and np.all(label[n:] == 0)
        assert all(b["corrupt"].sum() == 0 for b in batches)
        seen.extend(ids)
    assert sorted(seen) == sorted(test)


# ---------------------------------------------------------------- train stream


def test_train_stream_is_deterministic_in_seed():
    cfg = config(name="digits", image_size=16)

    def first_batches(seed):
        split = data.create_split(cfg, train=True, batch_size=32, seed=seed, process_index=0, process_count=1)
        return take(iter(split.dataset), 3)

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    batch = a[0]
    assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["valid"].dtype == np.float32
    assert batch["corrupt"].dtype == np.int32
    assert np.all(batch["valid"] == 1) and np.all(batch["corrupt"] == 0)
    assert set(np.concatenate([x["label"] for x in a])) <= set(range(10))


def _identify(images, reference):
    """Index of each image in `reference` (exact match). images: [n, ...], reference: [N, ...]."""
    flat = reference.reshape(len(reference), -1)
    return [int(np.flatnonzero((flat == img.reshape(-1)).all(axis=1))[0]) for img in images]


def test_train_processes_split_each_global_batch_and_reshuffle_each_epoch():
    """Two processes of 5 read disjoint halves of the same global batches of 10 that one process
    of 10 reads; over an epoch they cover the data, and the next epoch is a new permutation."""
    # Synthetic examples are not augmented, so each image identifies its example.
    cfg = config(name="synthetic", image_size=2, num_examples=40, num_classes=5)
    _, reference = eval_batches(cfg, batch_size=40, seed=7)
    reference = reference[0]["image"]
    single = data.create_split(cfg, train=True, batch_size=10, seed=7, process_index=0, process_count=1)
    global_ids = [_identify(b["image"], reference) for b in take(iter(single.dataset), 8)]  # two epochs
    halves = []
    for p in range(2):
        split = data.create_split(cfg, train=True, batch_size=5, seed=7, process_index=p, process_count=2)
        halves.append([_identify(b["image"], reference) for b in take(iter(split.dataset), 8)])
    for step, ids in enumerate(global_ids):
        assert halves[0][step] + halves[1][step] == ids
        assert set(halves[0][step]).isdisjoint(halves[1][step])
    first, second = sum(global_ids[:4], []), sum(global_ids[4:], [])
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != second  # a fresh permutation each epoch


def test_resume_in_process_yields_exactly_the_next_batches():
    cfg = config(name="digits", image_size=8, num_workers=0)

    def new_iterator():
        split = data.create_split(cfg, train=True, batch_size=32, seed=5, process_index=0, process_count=1)
        return iter(split.dataset)

    it = new_iterator()
    take(it, 44)  # the 1437-example epoch ends inside batch 45
    state = it.get_state()
    text = json.dumps(state)
    assert json.loads(text) == state
    expected = take(it, 3)

    resumed = new_iterator()
    resumed.set_state(json.loads(text))
    assert_batches_equal(take(resumed, 3), expected)


def test_resume_with_worker_processes_matches_in_process_stream():
    def new_iterator(num_workers):
        cfg = config(name="digits", image_size=8, num_workers=num_workers)
        split = data.create_split(cfg, train=True, batch_size=32, seed=5, process_index=0, process_count=1)
        return iter(split.dataset)

    reference = take(new_iterator(0), 6)
    it = new_iterator(2)
    try:
        assert_batches_equal(take(it, 3), reference[:3])
        text = json.dumps(it.get_state())
        assert_batches_equal(take(it, 3), reference[3:])
    finally:
        it.close()
    resumed = new_iterator(2)
    try:
        resumed.set_state(json.loads(text))
        assert_batches_equal(take(resumed, 3), reference[3:])
    finally:
        resumed.close()


# ---------------------------------------------------------------- ImageNet: ImageFolder and decoding

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
CLASSES = ["n01000001", "n02000002", "n03000003"]
SIZES = [(48, 32), (32, 56), (40, 40)]  # (width, height)


def _jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """data_dir/{train,val}/<wnid>/: 3 classes x 3 uniform-colour JPEGs, plus in class 2 a file
    of random bytes and in class 3 a JPEG cut in half."""
    root = tmp_path_factory.mktemp("imagenet")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for split in ("train", "val"):
        for wnid, colour in zip(CLASSES, COLOURS):
            os.makedirs(root / split / wnid)
            for i, size in enumerate(SIZES):
                Image.new("RGB", size, colour).save(root / split / wnid / f"img{i}.JPEG", quality=95)
        (root / split / CLASSES[1] / "corrupt.JPEG").write_bytes(np.random.default_rng(1).bytes(3000))
        full = _jpeg_bytes(Image.fromarray(noise))
        (root / split / CLASSES[2] / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    return str(root)


def _check_decoded(batch, caplog, root, split):
    good = batch["valid"] == 1
    assert good.sum() == 9 and batch["corrupt"].sum() == 2
    np.testing.assert_array_equal(batch["corrupt"], 1 - batch["valid"])
    assert np.all(batch["image"][~good] == 0)
    # The uniform colour of each good image names its class.
    mean, std = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)
    for image, label in zip(batch["image"][good], batch["label"][good]):
        np.testing.assert_allclose(image, np.broadcast_to((np.array(COLOURS[label]) - mean) / std, image.shape), atol=0.06)
    assert sorted(batch["label"][good]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in (f"{CLASSES[1]}/corrupt.JPEG", f"{CLASSES[2]}/truncated.JPEG"):
        assert os.path.join(root, split, name) in warned


def test_image_folder_eval_masks_and_counts_corrupt_files(image_folder, caplog):
    cfg = config(name="imagenet", source="imagefolder", data_dir=image_folder, image_size=16)
    with caplog.at_level(logging.WARNING):
        split, batches = eval_batches(cfg, batch_size=11)
    assert (split.num_examples, split.num_classes, split.image_shape) == (11, 3, (16, 16, 3))
    assert len(batches) == 1 and batches[0]["image"].shape == (11, 16, 16, 3)
    _check_decoded(batches[0], caplog, image_folder, "val")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_folder_train_masks_and_counts_corrupt_files(image_folder, caplog):
    cfg = config(name="imagenet", source="imagefolder", data_dir=image_folder, image_size=16)
    split = data.create_split(cfg, train=True, batch_size=11, seed=0, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(split.dataset))  # one batch = one epoch of the 11 files
    assert batch["image"].shape == (11, 16, 16, 3)
    _check_decoded(batch, caplog, image_folder, "train")


def test_imagenet_refuses_to_run_with_truncated_loading_enabled(image_folder, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    cfg = config(name="imagenet", source="imagefolder", data_dir=image_folder, image_size=16)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        data.create_split(cfg, train=False, batch_size=4, seed=0, process_index=0, process_count=1)


def test_image_folder_missing_tree_says_what_is_expected(tmp_path):
    cfg = config(name="imagenet", source="imagefolder", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train/<wnid>"):
        data.create_split(cfg, train=True, batch_size=4, seed=0, process_index=0, process_count=1)


def test_eval_view_is_resize_then_center_crop():
    # 100x50 -> shorter side 18 (16 / 0.875 rounded) -> 36x18 -> central 16x16.
    x = np.linspace(0, 255, 100)
    image = Image.fromarray(np.broadcast_to(np.stack([x, x[::-1], 0 * x], -1), (50, 100, 3)).astype(np.uint8))
    out = transforms.resize_and_center_crop(image, 16, 18)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # The crop is central: mirroring the input mirrors the output.
    mirrored = transforms.resize_and_center_crop(image.transpose(Image.FLIP_LEFT_RIGHT), 16, 18)
    np.testing.assert_allclose(mirrored.astype(int), out[:, ::-1].astype(int), atol=1)
    # 36 columns keep the middle 16: the horizontal ramp spans (10..26)/36 of its range.
    assert out[0, 0, 0] == pytest.approx(255 * 10.5 / 36, abs=8)
    assert transforms.resize_and_center_crop(Image.new("RGB", (300, 500)), 224, 256).shape == (224, 224, 3)


def test_random_resized_crop_box_follows_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        left, top, w, h = transforms.random_resized_crop_box(64, 48, rng)
        assert 0 <= left and left + w <= 64 and 0 <= top and top + h <= 48
        assert 0.08 * 0.9 <= w * h / (64 * 48) <= 1.0
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15  # up to rounding of small crops
    # No draw fits a 1000x10 strip: the fallback is the central crop of ratio 4/3 (or 3/4).
    assert transforms.random_resized_crop_box(1000, 10, rng) == (493, 0, 13, 10)
    assert transforms.random_resized_crop_box(10, 1000, rng) == (0, 493, 10, 13)
    for size in [(300, 200), (50, 400), (17, 17)]:
        out = transforms.random_resized_crop(Image.new("RGB", size), 24, rng)
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def test_train_views_flip_about_half_the_time():
    # A left-to-right ramp stays increasing through any crop and resize unless mirrored.
    ramp = np.broadcast_to(np.linspace(0, 255, 64)[None, :, None], (48, 64, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    record = ("ramp.png", buffer.getvalue(), 0)  # the tfds source's record form: encoded bytes
    preprocess = imagenet.Preprocess(image_size=16)
    flipped = 0
    for i in range(400):
        image = preprocess(record, np.random.default_rng(i))["image"]
        assert image.shape == (16, 16, 3)
        flipped += image[:, -1].mean() < image[:, 0].mean()
    assert 160 <= flipped <= 240  # Binomial(400, 1/2): +-4 standard deviations

    fashion = fashion_mnist.Preprocess(image_size=28)
    ramp28 = np.broadcast_to(np.linspace(1, 255, 28)[None, :], (28, 28)).astype(np.uint8)
    flipped = 0
    for i in range(400):
        image = fashion((ramp28, 0), np.random.default_rng(i))["image"][..., 0]
        flipped += image[14, 10] > image[14, 17]
    assert 160 <= flipped <= 240


def test_tfds_source_leaves_missing_tars_to_tfds(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    cfg = config(name="imagenet", source="tfds", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    os.makedirs(tmp_path / "manual")
    with pytest.raises(Exception) as error:
        data.create_split(cfg, train=True, batch_size=4, seed=0, process_index=0, process_count=1)
    if isinstance(error.value, ImportError):
        pytest.skip(f"tensorflow-datasets cannot prepare datasets in this environment: {error.value}")
    assert "manual" in str(error.value).lower()


def test_tfds_records_feed_encoded_jpegs_to_the_decoder():
    # The form `as_data_source(..., decoders={"image": SkipDecoding()})` returns.
    source = [
        {"image": _jpeg_bytes(Image.new("RGB", (40, 30), COLOURS[2])), "label": np.int64(2), "file_name": b"n03_1.JPEG"},
        {"image": b"not a jpeg", "label": np.int64(1), "file_name": b"n02_7.JPEG"},
    ]
    records = imagenet.TfdsRecords(source)
    assert len(records) == 2 and records[0][0] == "n03_1.JPEG" and records[0][2] == 2
    good, bad = (imagenet.Preprocess(image_size=16)(records[i], None) for i in range(2))
    assert good["image"].shape == (16, 16, 3) and good["label"] == 2 and good["corrupt"] == 0
    mean, std = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)
    np.testing.assert_allclose(good["image"], np.broadcast_to((np.array(COLOURS[2]) - mean) / std, (16, 16, 3)), atol=0.06)
    assert bad["corrupt"] == 1 and bad["label"] == 1 and np.all(bad["image"] == 0)


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_sizes_labels_and_statistics():
    cfg = config(name="fashion_mnist", image_size=28)
    train = data.create_split(cfg, train=True, batch_size=64, seed=0, process_index=0, process_count=1)
    test = data.create_split(cfg, train=False, batch_size=500, seed=0, process_index=0, process_count=1)
    assert (train.num_examples, test.num_examples) == (60000, 10000)
    assert train.num_classes == 10 and train.image_shape == (28, 28, 1)
    batch = next(iter(test.dataset))
    assert batch["image"].shape == (500, 28, 28, 1) and np.all(batch["valid"] == 1)

    with gzip.open(os.path.join(FASHION_MNIST, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    np.testing.assert_array_equal(batch["label"], labels[:500])
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10

    images, train_labels = fashion_mnist.load(FASHION_MNIST, True)
    assert images.shape == (60000, 28, 28) and set(np.unique(train_labels)) == set(range(10))
    pixels = images.astype(np.float64)
    assert (pixels.mean(), pixels.std()) == pytest.approx((fashion_mnist.MEAN, fashion_mnist.STD), abs=1e-4)
    np.testing.assert_allclose(
        batch["image"][:8, ..., 0], (fashion_mnist.load(FASHION_MNIST, False)[0][:8] - fashion_mnist.MEAN) / fashion_mnist.STD,
        atol=1e-5,
    )


def _write_idx(path, array):
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_validation_split_holds_out_training_images(tmp_path):
    # 50 training images whose pixels are their index; 5 test images of 255s that validation never reads.
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.broadcast_to(np.arange(50)[:, None, None], (50, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(50) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.full((5, 28, 28), 255))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5))

    def indices(name, seed):
        """(examples, the images' indices) of split `name`; train: two epochs of its 40 images."""
        cfg = config(name="fashion_mnist", path=str(tmp_path), image_size=28, validation_size=10)
        train = name == "train"
        split = data.create_split(cfg, train=train, batch_size=10, seed=seed, process_index=0, process_count=1)
        batches = itertools.islice(iter(split.dataset), 8) if train else iter(split.dataset)
        pixels = np.concatenate([b["image"][b["valid"] > 0, 14, 14, 0] for b in batches])  # centre: never cropped off
        return split.num_examples, set(np.rint(pixels * fashion_mnist.STD + fashion_mnist.MEAN).astype(int).tolist())

    (num_val, val), (num_train, train) = indices("validation", 0), indices("train", 0)
    assert (num_val, num_train) == (10, 40) and len(val) == 10 and not val & train and val | train == set(range(50))
    assert indices("validation", 7)[1] == val  # the training seed never moves an image between the splits
    assert sorted(val) == fashion_mnist.validation_indices(50, 10)[1].tolist()
    with pytest.raises(ValueError, match=r"data.validation_size must be in \[0, 50\)"):
        fashion_mnist.validation_indices(50, 50)


def test_fashion_mnist_missing_files_name_the_debian_package(tmp_path):
    cfg = config(name="fashion_mnist", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        data.create_split(cfg, train=True, batch_size=4, seed=0, process_index=0, process_count=1)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(error.value)


# ---------------------------------------------------------------- config


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match="config.data.name must be one of digits, fashion_mnist, imagenet, synthetic "
                                         "for classification; got 'cifar'"):
        data.create_split(config(name="cifar"), train=True, batch_size=4, seed=0, process_index=0, process_count=1)


def test_synthetic_is_deterministic_from_seed_and_sized_by_config():
    cfg = config(name="synthetic", image_size=8, num_classes=7, num_examples=30)
    split, a = eval_batches(cfg, batch_size=16, seed=1)
    _, b = eval_batches(cfg, batch_size=16, seed=1)
    _, c = eval_batches(cfg, batch_size=16, seed=2)
    assert (split.num_examples, split.num_classes, split.image_shape) == (30, 7, (8, 8, 3))
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    labels = np.concatenate([x["label"] for x in a])[:30]
    assert labels.min() >= 0 and labels.max() < 7
    assert np.concatenate([x["valid"] for x in a]).sum() == 30


def test_an_epoch_is_the_samplers_whole_batches_of_the_records_it_trains_on():
    """`batches_per_epoch` (what a schedule counts epochs in) is where the stream's epoch turns: per
    bucket, its training records // the global batch; records left out of training count for nothing."""
    from cvolution_jax.data import pipeline

    bucket_of = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 1], np.int32)
    sampler = pipeline.GroupSampler(((8, 16), (16, 8)), bucket_of, train_ids=np.array([0, 1, 3, 4, 5, 6, 7, 9]))
    # Bucket 0 trains on records 0, 1 (one batch of 2), bucket 1 on 3, 4, 5, 6, 7, 9 (three).
    assert sampler.batches_per_epoch(10, 2) == 4 and pipeline.DefaultSampler().batches_per_epoch(10, 3) == 3
    batches = sampler.train_batches(10, 2, 1, seed=0)
    epochs = [int(batches[t][1].max()) for t in range(9)]
    assert epochs == [0] * 4 + [1] * 4 + [2]
    examples = pipeline.Examples(list(range(10)), None, None, 1, sampler)
    assert pipeline.batches_per_epoch(examples, 2) == 4
