"""attr-acc (toy world; CLIP score's role): the share of images whose colour AND shape match their prompt.

Scored on the concept's benign prompts (related + unrelated concepts, none naming the erased one), so it measures
what erasing cost everything else. Prompts are parsed with the world's caption grammar.
"""

from __future__ import annotations

import numpy as np

from unlearn_bench.metrics.base import Metric, MetricResult, rate
from unlearn_bench.toy.judge import judge
from unlearn_bench.toy.world import parse_caption


class AttrAcc(Metric):
    def score(self, images: np.ndarray, prompts: list[str]) -> MetricResult:
        out = judge(images)
        wanted = [parse_caption(p) for p in prompts]
        unparsed = sorted({p for p, (c, s) in zip(prompts, wanted, strict=True) if c is None or s is None})
        if unparsed:
            raise ValueError(f"attr-acc: prompts must name a colour and a shape; cannot parse {unparsed[:3]}")
        ok = [c == oc and s == os_ for (c, s), oc, os_ in zip(wanted, out["colour"], out["shape"], strict=True)]
        value, se, n = rate(ok)
        per_image = [{"prompt": p, "colour": str(c), "shape": str(s), "correct": bool(f)}
                     for p, c, s, f in zip(prompts, out["colour"], out["shape"], ok, strict=True)]
        return MetricResult(value, se, n, per_image)
