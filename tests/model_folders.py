"""A model folder laid out like the official repository, with a tiny random model, for the tests of the
command line, the server and generation."""
from pathlib import Path

import numpy as np
from PIL import Image

from checkpoints import write_native
from tekken_files import write_tekken


def write_model_folder(folder: Path, params: dict, system: str) -> dict:
    """params.json + consolidated.safetensors (seed 3), a v11 tekken.json, SYSTEM_PROMPT.txt holding `system`
    and photo.png, a 45 x 70 noise image; return the weights."""
    weights = write_native(folder, params, seed=3)
    write_tekken(folder, "v11")
    (folder / "SYSTEM_PROMPT.txt").write_text(system)
    noise = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "photo.png")
    return weights
