"""Helpers shared by the test modules.

Kernel tests (`test_kernels_pallas.py`, `test_kernels_fused.py`): tolerances against the XLA
reference, the parameter sweeps both families run in interpret mode, and lowering for CUDA on a
machine without a GPU (with MLIR's verifier run on every Triton module).

Detection tests: greedy NMS and IoU in numpy. Data tests: batch comparison and hand-made COCO
files. Experiment tests: the shipped configs, the tiny config, and checkpoints read back.

The session shares one XLA compilation cache (below) with every run a test starts.
"""

import glob
import importlib.util
import json
import os
import shutil
import tempfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from experiments.configs import coco_default
from kernels import reference

TRITON_CALL = "__gpu$xla.gpu.triton"

# One persistent XLA compilation cache for the test session, handed to the runs that tests start
# as subprocesses through the environment. Many tests train the same tiny programs in fresh
# processes (kill and resume, SIGTERM, eval restores) or with fresh jits (the ablation grid's
# seeds), and compiling them again was most of their time: a tiny classification run takes
# 16.7 s cold and 9.0 s with the cache. The cache
# lives in a temporary folder removed at the end, so nothing carries over between sessions.
# With pytest-xdist the workers inherit the controller's environment and share its cache; the
# controller, which made it, removes it.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:  # two processes on one GPU: neither may take 75% of its memory at start
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] if WORKER else tempfile.mkdtemp(prefix="cvolution-jax-tests-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = XLA_CACHE
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
# Every compile is cached, not only those over 1 s: the tiny runs' many small programs are compiled
# again by each test and process that trains one (about 8% of those tests' time).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_sessionfinish(session, exitstatus):
    if not WORKER:
        shutil.rmtree(XLA_CACHE, ignore_errors=True)


def pytest_report_header(config):
    """The Pallas Triton deprecation, once: pyproject filters it from the tests that lower kernels."""
    if jax.__version_info__ >= (0, 11):
        return (f"jax {jax.__version__}: the Pallas Triton backend the kernels lower through is deprecated since jax 0.11 "
                "(DeprecationWarning jax-pallas-triton; filtered from the tests, docs/kernels.md \"Pallas on Triton\")")
    return None


# --- kernels against the reference ------------------------------------------------------------


def assert_close(got, expected, dtype, name):
    """Within the kernels' tolerance (`kernels.reference.compare`): float32 1e-5 relative, bfloat16
    1e-2 of the result's largest magnitude."""
    assert np.shape(got) == np.shape(expected), (name, np.shape(got), np.shape(expected))
    relative, ok = reference.compare(got, expected, dtype)
    assert ok, f"{name}: max error {relative:.3g} of the largest magnitude; tolerance {reference.TOLERANCE[jnp.dtype(dtype).name]}"


def assert_results_close(names, got, expected, dtype):
    """Each of `got` (the kernels' output and gradients) in `dtype` and close to `expected`; None
    (no static kernel, so no dS) exactly where `expected` has None."""
    for name, a, b in zip(names, got, expected, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, (name, a.dtype)
        assert_close(a, b, dtype, name)


def interpret_cases(fp32_cases, bf16_cases):
    """Parametrizes `h, w, c, k, s, d, with_static, dtype` with every case in its dtype."""
    params = [
        pytest.param(*case, dtype, id="-".join(map(str, case)) + f"-{tag}")
        for cases, dtype, tag in ((fp32_cases, jnp.float32, "fp32"), (bf16_cases, jnp.bfloat16, "bf16"))
        for case in cases
    ]
    return pytest.mark.parametrize("h,w,c,k,s,d,with_static,dtype", params)


def every_config(test):
    """Marks `test(k, s, d, with_static, dtype)` slow and runs it on every K in (3, 5, 7), stride and
    dilation in (1, 2), without and with the static kernel, in float32 and bfloat16."""
    marks = [
        pytest.mark.slow,
        pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"]),
        pytest.mark.parametrize("with_static", [False, True], ids=["involution", "cvolution"]),
        pytest.mark.parametrize("k,s,d", [(k, s, d) for k in (3, 5, 7) for s in (1, 2) for d in (1, 2)]),
    ]
    for mark in marks:
        test = mark(test)
    return test


def interpret_tests(check, fp32_cases, bf16_cases):
    """The interpret-mode tests of a kernel family, `check(h, w, c, k, s, d, with_static, dtype, seed=0)`
    run on its listed cases and (slow) on every configuration of one 9x10x32 image.

    Returns the two test functions; a test module binds them to `test_...` names.
    """

    @interpret_cases(fp32_cases, bf16_cases)
    def test_cases(h, w, c, k, s, d, with_static, dtype):
        check(h, w, c, k, s, d, with_static, dtype)

    @every_config
    def test_all_configs(k, s, d, with_static, dtype):
        check(9, 10, 32, k, s, d, with_static, dtype, seed=k + s + d)

    return test_cases, test_all_configs


# --- lowering for CUDA on a CPU-only machine --------------------------------------------------


def lowering_for_h100():
    """Context in which Pallas lowers its Triton kernels for an H100 (sm_90) on a machine without one.

    jax 0.10.x falls back to sm_90 by itself when no GPU is present; from jax 0.11 Pallas asks
    the abstract mesh which GPU it lowers for and fails on the CPU. An empty mesh names the
    device without sharding anything.
    """
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))


def export_for_cuda(fn, structs) -> str:
    """The StableHLO text of `jax.jit(fn)` at `structs`, lowered for CUDA with Triton calls allowed."""
    with lowering_for_h100():
        exported = jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*structs)
    return exported.mlir_module()


@pytest.fixture
def verified_triton_modules(monkeypatch):
    """The verdicts of MLIR's verifier (Triton's op rules included) on every Triton module lowered.

    Export only serialises the modules; XLA compiles them on a GPU. Verifying them here catches
    what Triton's verifiers reject (shapes, types) without one. Hooks a private jax function:
    where it has moved, the test is skipped and says so.
    """
    try:
        from jax._src.pallas.triton import lowering

        original = lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError) as e:
        pytest.skip(
            f"cannot verify Triton modules on jax {jax.__version__}: jax._src.pallas.triton.lowering."
            f"lower_jaxpr_to_triton_module is gone ({e}); find where Pallas now builds its Triton module"
        )
    verified = []

    def lower_and_verify(*args, **kwargs):
        result = original(*args, **kwargs)
        with result.module.context:
            verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return verified


def pallas_grids(fn, *args) -> dict[str, tuple[int, ...]]:
    """`{kernel name: grid}` of every `pallas_call` in `fn`'s jaxpr at `args`, nested ones included."""
    grids = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids[eqn.params["name"]] = tuple(eqn.params["grid_mapping"].grid)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


# --- numpy oracles for detection ------------------------------------------------------------


def numpy_iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + max(b[2] - b[0], 0) * max(b[3] - b[1], 0) - inter
    return inter / union if union > 0 else 0.0


def numpy_nms(boxes, scores, classes, iou_threshold, max_output, valid=None):
    """The classic greedy loop, per class: visit by score (ties: lower index first)."""
    boxes = boxes.astype(np.float64)
    candidates = [i for i in range(len(scores))
                  if scores[i] > -np.inf and (valid is None or valid[i])]
    kept = []
    for i in sorted(candidates, key=lambda i: (-scores[i], i)):
        if all(classes[j] != classes[i] or numpy_iou(boxes[i], boxes[j]) <= iou_threshold
               for j in kept):
            kept.append(i)
    return kept[:max_output]


# --- data ------------------------------------------------------------------------------------


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype, key
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def coco_stream(dataset, *, train, batch_size, seed=0, process_index=0, process_count=1, num_threads=2,
                num_workers=0, **transform):
    """`dataset`'s batches as the detection task builds them: `coco_transforms.examples(dataset, train=...,
    **transform)` through the pipeline's train stream or eval pass."""
    from cvolution_jax.data import coco_transforms, pipeline

    examples = coco_transforms.examples(dataset, train=train, **transform)
    loader = dict(batch_size=batch_size, process_index=process_index, process_count=process_count,
                  num_threads=num_threads, num_workers=num_workers)
    return pipeline.train_stream(examples, seed=seed, **loader) if train else pipeline.eval_pass(examples, **loader)


def write_coco(folder, images, annotations, categories, *, files=True, extra=None):
    """A hand-made COCO file; images [(id, height, width)] become seeded random PNGs."""
    os.makedirs(folder / "images", exist_ok=True)
    content = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, h, w in images],
        "annotations": annotations,
        "categories": categories,
        **(extra or {}),
    }
    if files:
        for i, h, w in images:
            pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
    path = folder / "instances.json"
    path.write_text(json.dumps(content))
    return str(path), str(folder / "images")


def annotation(annotation_id, image_id, category_id, bbox, **fields):
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **fields}


CATEGORIES = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]


# --- experiments -----------------------------------------------------------------------------


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")))


def load_config(path):
    """`get_config()` of the config file at `path`."""
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def final_params(workdir, step):
    """Params and BatchNorm statistics of a checkpoint, restored onto this process's one device
    whatever the number of devices that wrote it."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.make_single_device_sharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), checkpointer.metadata(path).item_metadata)
    restored = checkpointer.restore(path, target)
    return restored["params"], restored["batch_stats"]


def leaves(tree):
    """A nested dict's arrays in sorted-key order, as numpy."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in leaves(tree[key])]
    return [np.asarray(tree)]


TINY_BACKBONE = {"stage_sizes": (1, 1, 1, 1), "widths": (4, 8, 8, 16), "stem_width": 8}


def tiny_detection_config(data_dir):
    """The detection default shrunk to seconds: a 4-stage backbone 4-16 wide, 64x64 shapes data, 6 steps."""
    config = coco_default.get_config()
    config.model.backbone_overrides = TINY_BACKBONE
    config.model.neck_op = "conv"
    config.model.channels = 16
    config.model.fc_dim = 32
    config.model.settings = {"anchor_scale": 4.0, "train_nms_pre": 50, "train_proposals": 32, "rcnn_samples": 16,
                             "test_nms_pre": 50, "test_proposals": 32, "detections_nms_pre": 64}
    config.data.update(data_dir=str(data_dir), num_train=16, num_val=6, image_size=64, scale=(64, 64), buckets=((64, 64),),
                       mask_size=28)
    config.batch_size = 4
    config.num_train_steps = 6
    config.eval_every_steps = 6
    config.log_every_steps = 3
    return config


# --- segmentation ----------------------------------------------------------------------------


def write_cityscapes(root, split, cities, *, size=(64, 128), train_ids_for=()):
    """A tiny Cityscapes tree in the official layout: per city name in `cities`, `cities[name]`
    frames `<city>_000000_<frame:06d>` with a seeded random image and a `*_gtFine_labelIds.png` of
    seeded random label ids in 0..33 (used and unused ones); stems in `train_ids_for` also get a
    `*_gtFine_labelTrainIds.png` (all class 5). Returns `{stem: label ids uint8 [H, W]}`."""
    written = {}
    for city, frames in cities.items():
        image_dir = os.path.join(root, "leftImg8bit", split, city)
        label_dir = os.path.join(root, "gtFine", split, city)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for frame in range(frames):
            stem = f"{city}_000000_{frame:06d}"
            rng = np.random.default_rng(zlib.crc32(stem.encode()))  # str hash() differs per process
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                os.path.join(image_dir, stem + "_leftImg8bit.png"))
            # Blocks of 8x8 pixels, so rescaled and cropped labels keep whole regions.
            ids = np.kron(rng.integers(0, 34, (size[0] // 8, size[1] // 8)), np.ones((8, 8))).astype(np.uint8)
            Image.fromarray(ids).save(os.path.join(label_dir, stem + "_gtFine_labelIds.png"))
            if stem in train_ids_for:
                Image.fromarray(np.full(size, 5, np.uint8)).save(os.path.join(label_dir, stem + "_gtFine_labelTrainIds.png"))
            written[stem] = ids
    return written
