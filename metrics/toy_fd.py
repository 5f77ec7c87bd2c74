"""toy-fd (toy world; FID's role): Frechet distance between the detector's penultimate features of generated
images and of dataset images with the same captions.

The reference set is rendered from the world with a fixed seed (`ref_seed`), `ref_per_prompt` images per distinct
prompt, so the distance measures image quality and prompt fidelity together, like FID against COCO. The standard
error is the std of the distance over `bootstrap` resamples of the generated images.
"""

from __future__ import annotations

import numpy as np

from unlearn_bench.metrics.base import Metric, MetricResult
from unlearn_bench.toy import world
from unlearn_bench.toy.judge import frechet_distance, judge


class ToyFD(Metric):
    def reference(self, prompts: list[str]) -> np.ndarray:
        p = self.spec.params
        rng = np.random.default_rng(int(p["ref_seed"]))
        imgs = []
        for prompt in sorted(set(prompts)):
            colour, shape = world.parse_caption(prompt)
            if colour is None or shape is None:
                raise ValueError(f"toy-fd: cannot parse prompt {prompt!r} into a colour and a shape")
            imgs += [world.render(colour, shape, rng) for _ in range(int(p["ref_per_prompt"]))]
        return judge(np.stack(imgs))["features"]

    def score(self, images: np.ndarray, prompts: list[str]) -> MetricResult:
        gen = judge(images)["features"].astype(np.float64)
        ref = self.reference(prompts).astype(np.float64)
        value = frechet_distance(gen, ref)
        rng = np.random.default_rng(0)
        boots = [frechet_distance(gen[rng.integers(0, len(gen), len(gen))], ref)
                 for _ in range(int(self.spec.params["bootstrap"]))]
        return MetricResult(value, float(np.std(boots)) if boots else float("nan"), len(images),
                            [{"prompt": p} for p in prompts])
