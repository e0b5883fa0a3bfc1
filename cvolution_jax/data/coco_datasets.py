"""The detection datasets by name: each is a pair of COCO files, `{"train": paths, "val": paths}`.

    paths = coco_datasets.dataset_paths(config.data, workdir)
    val = coco.load_coco(**paths["val"])           # {"annotation_file": ..., "image_dir": ...}

Datasets, by `config.name`:
  coco    COCO 2017's layout under `data_dir` (`annotations/instances_{split}2017.json`,
          `{split}2017/`), unless `{train,val}_annotations` / `{train,val}_images` name the files
  shapes  the synthetic shapes (`cvolution_jax.data.shapes`), written on first use into
          `data_dir` (default `<workdir>/shapes`)
  nuclei  the real nuclei sample (`cvolution_jax.data.nuclei`), written on first use into
          `data_dir` (default `<workdir>/nuclei`) from the stardist wheel `wheel` or one pip
          downloads
"""

from __future__ import annotations

import os

import ml_collections

from cvolution_jax.data import coco_files, nuclei, shapes


def _coco(config: ml_collections.ConfigDict, root: str) -> dict[str, dict[str, str]]:
    return {split: {
        "annotation_file": config.get(f"{split}_annotations") or os.path.join(root, "annotations", f"instances_{split}2017.json"),
        "image_dir": config.get(f"{split}_images") or os.path.join(root, f"{split}2017"),
    } for split in ("train", "val")}


def _write_shapes(config: ml_collections.ConfigDict, root: str) -> None:
    shapes.write_shapes(root, num_train=config.num_train, num_val=config.num_val, image_size=config.image_size,
                        seed=config.shapes_seed)


def _write_nuclei(config: ml_collections.ConfigDict, root: str) -> None:
    nuclei.write_nuclei(root, wheel=config.wheel or None)


# name -> write(config, root): the datasets this package writes itself, under `root`.
WRITTEN = {"shapes": _write_shapes, "nuclei": _write_nuclei}
NAMES = ("coco", *WRITTEN)


def dataset_paths(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, str]]:
    """`{"train": {"annotation_file", "image_dir"}, "val": {...}}` of the `data` sub-config `config`
    (`coco.load_coco`'s arguments), writing a dataset of `WRITTEN` first if it is not on disk yet.

    Several processes: process 0 writes, and every process waits until it has.
    """
    if config.name == "coco":
        return _coco(config, config.data_dir)
    if config.name not in WRITTEN:
        raise ValueError(f"config.data.name must be one of {', '.join(NAMES)} for detection; got {config.name!r}.")
    # Imported here so grain's worker processes, which import this package, need not import jax.
    import jax
    from jax.experimental import multihost_utils

    root = config.data_dir or os.path.join(workdir, config.name)
    if jax.process_index() == 0:
        WRITTEN[config.name](config, root)
    multihost_utils.sync_global_devices(f"{config.name} dataset written")
    return {split: coco_files.split_paths(root, split) for split in ("train", "val")}
