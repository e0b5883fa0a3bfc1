"""Write the real nuclei sample (stardist 0.9.2's 2-D image) as COCO files with RLE masks.

    python -m experiments.data.nuclei --out /tmp/nuclei [--wheel stardist-0.9.2-...whl]

Without --wheel, pip downloads the wheel into <out>/wheel/ (once). Train: 117 tiles of 128 x 128
from x in [0, 384); val: the 512 x 128 strip x in [384, 512). See `cvolution_jax.data.nuclei`.
Prints the two splits' `load_coco` arguments and their image, nucleus and crowd-fragment counts.
"""

import argparse
import json
import logging

from cvolution_jax.data import nuclei


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--wheel", default=None,
                        help="a stardist-0.9.2-*.whl already on disk (default: pip download into OUT/wheel)")
    args = parser.parse_args(argv)
    # force: importing grain (via cvolution_jax.data) installs a root handler, which would make
    # a plain basicConfig a no-op and hide the INFO summary.
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    paths = nuclei.write_nuclei(args.out, wheel=args.wheel)
    for split, split_paths in paths.items():
        with open(split_paths["annotation_file"]) as f:
            content = json.load(f)
        crowd = sum(a["iscrowd"] for a in content["annotations"])
        print(f"{split}: {split_paths['annotation_file']} ({len(content['images'])} images, "
              f"{len(content['annotations']) - crowd} nuclei, {crowd} crowd fragments; images in "
              f"{split_paths['image_dir']})")
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
