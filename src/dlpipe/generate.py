"""`dlpipe generate`: images from an exported generator, with ONNX Runtime only (no torch).

The latent vectors come from `dlpipe.runtime.latent_vectors(n, latent_dim, seed)`: the same seed gives the
same images here, from the PyTorch generator, in serving, and in the pipeline's sample grids (seed 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dlpipe.config import load_serving_config
from dlpipe.data.pixels import image_grid, image_layout, png_bytes, to_uint8
from dlpipe.errors import DlpipeError
from dlpipe.io import atomic_path
from dlpipe.runtime import InputContract, create_session, latent_vectors, run_batched

MAX_IMAGES = 100_000  # more is a typo, not a request: 100,000 MNIST-sized PNGs are already ~50 MB


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlpipe generate",
        description="Generate images with an exported generator: PNG files in a folder, or one grid PNG.",
    )
    p.add_argument("model", nargs="?", default=None, help="a model of params `generators` (default: the only one)")
    p.add_argument("--n", type=int, default=64, help="how many images (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="latent seed (default: 0, the pipeline's sample grid)")
    p.add_argument(
        "--out", type=Path, required=True, help="a folder (one PNG per image) or a file ending in .png (a grid)"
    )
    p.add_argument("--columns", type=int, default=8, help="images per row of a grid (default: 8)")
    p.add_argument(
        "--file", type=Path, default=None, help="the generator's ONNX file (default: models/<model>/model.onnx)"
    )
    p.add_argument("--params", default=None, help="params file (default: $DLPIPE_PARAMS, else ./params.yaml)")
    return p


def _generator_file(args: argparse.Namespace) -> Path:
    if args.file is not None:
        return args.file
    config = load_serving_config(args.params)
    generators = list(config.params.generators)
    if args.model is None:
        if len(generators) != 1:
            raise DlpipeError(
                f"name the generator: params `generators` has {len(generators)} ({', '.join(generators)})"
            )
        args.model = generators[0]
    elif args.model not in generators:
        raise DlpipeError(
            f"unknown generator {args.model!r}: not in generators of {config.params_file} "
            f"({', '.join(generators) or 'none'})"
        )
    return config.paths.onnx(args.model)


def generate(path: Path, count: int, seed: int) -> np.ndarray:
    """uint8 images (count, C, H, W) from the generator graph at `path`."""
    if not path.is_file():
        raise DlpipeError(f"{path}: file not found (run `dvc repro`, or `dlpipe export <generator>`)")
    session = create_session(path)
    contract = InputContract.of(session)
    if len(contract.shape) != 2 or contract.shape[1] is None:
        raise DlpipeError(f"{path}: not a generator graph (its input is {contract.shape}, not [batch, latent_dim])")
    return to_uint8(run_batched(session, latent_vectors(count, contract.shape[1], seed), batch_size=256))


def _write_folder(images, out: Path) -> None:
    """One PNG per image, 0000.png...; the folder appears whole (a temporary sibling, then renamed) when it
    did not exist, and an existing folder gets each file whole."""
    width = max(4, len(str(len(images) - 1)))
    if out.exists() and not out.is_dir():
        raise DlpipeError(f"--out {out}: exists and is not a folder")
    target = out if out.is_dir() else Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    if target != out:
        target.chmod(0o755)  # mkdtemp's private 0700 is for the temporary name, not for the folder it becomes
    try:
        for index, pixels in enumerate(images):
            with atomic_path(target / f"{index:0{width}d}.png") as tmp:
                tmp.write_bytes(png_bytes(image_layout(pixels)))
        if target != out:
            os.replace(target, out)
    except BaseException:
        if target != out:
            shutil.rmtree(target, ignore_errors=True)
        raise


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not 1 <= args.n <= MAX_IMAGES:
        raise DlpipeError(f"--n: {args.n} images; give 1 to {MAX_IMAGES}")
    if args.columns < 1:
        raise DlpipeError(f"--columns: {args.columns}; give at least 1")
    if args.seed < 0:
        raise DlpipeError(f"--seed: {args.seed}; give a non-negative integer")
    out = args.out
    if not out.parent.is_dir():
        if out.parent.exists():  # `--out afile/grid.png`: the "folder" is a regular file
            raise DlpipeError(f"--out {out}: {out.parent} is not a folder")
        raise DlpipeError(f"--out {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise DlpipeError(f"--out {out}: not writable")
    grid = out.suffix.lower() == ".png"
    # Refused before generating: a grid cannot replace a folder, nor PNG files go into a regular file.
    if grid and out.is_dir():
        raise DlpipeError(f"--out {out}: is a folder (a grid is written to a .png file; a folder's name has no .png)")
    if not grid and out.exists() and not out.is_dir():
        raise DlpipeError(f"--out {out}: exists and is not a folder")
    images = generate(_generator_file(args), args.n, args.seed)
    if grid:
        with atomic_path(out) as tmp:
            tmp.write_bytes(png_bytes(image_grid(images, args.columns)))
        print(f"dlpipe: {len(images)} images (seed {args.seed}) in the grid {out}")
    else:
        _write_folder(images, out)
        print(f"dlpipe: {len(images)} images (seed {args.seed}) in {out}/")
    return 0
