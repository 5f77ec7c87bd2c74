"""clip-zeroshot: the share of images that CLIP, zero-shot, assigns to the concept rather than to a list of
alternatives (lower is better) - a judge for any concept without a specialised classifier.

Each image is compared (cosine of open_clip embeddings, as in CLIP's zero-shot classification: Radford et al.,
ICML 2021) with one text per class, `template` filled with the concept's text and with each alternative; the image
shows the concept when the concept's text is among the top_k. The ranking rule with ties is metrics/classifier.py's
with the concept as class 0, so an exact tie counts as showing the concept. Per image: every class's cosine, the
winner, and the concept's softmax probability at the model's own logit scale.

The defaults are project choices (no seed paper uses this judge): for the four objects, the other nine Imagenette
classes (UnlearnDiffAtk's object list) as alternatives with "a photo of a {}"; for Van Gogh, eight other painters
with "a painting by {}". Any open_clip model the user has works (`model`, `pretrained`: a tag found in the local
cache or a checkpoint file; `model_config` registers a JSON architecture); weights resolve exactly as for the
`clip` metric (metrics/clip_score.py), and a missing file stops planning with the command that fetches it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unlearn_bench.components import DEFAULT_CONTEXT, MetricContext
from unlearn_bench.metrics.base import Metric, MetricResult, rate
from unlearn_bench.metrics.classifier import concept_value, rank_of, softmax, top_classes
from unlearn_bench.metrics.clip_score import ClipScore, ClipWeightsMissing, backbone_params, load_clip


class ClipZeroShot(Metric):
    """Params: model, pretrained, model_config (as `clip`), template, concept_text and alternatives (per concept),
    top_k."""

    def __init__(self, spec: Any, concept: Any) -> None:
        super().__init__(spec, concept)
        p = spec.params
        self.model_name, self.pretrained, self.model_config = backbone_params(p)
        what = f"metric.{spec.name}"
        self.template = str(concept_value(p.get("template", "{}"), concept, f"{what}.template"))
        if "{}" not in self.template:
            raise ValueError(f"{spec.name}: template {self.template!r} has no '{{}}' for the class text")
        text = concept_value(p.get("concept_text"), concept, f"{what}.concept_text")
        self.concept_text = str(text or concept.target)
        self.alternatives = [str(a) for a in concept_value(p.get("alternatives") or [], concept,
                                                           f"{what}.alternatives")]
        if not self.alternatives:
            raise ValueError(f"{spec.name}: no alternatives for concept '{concept.name}' to compare it with; e.g. "
                             f"--set '{what}.alternatives.{concept.name}=[a dog, a car]'")
        if self.concept_text in self.alternatives:
            raise ValueError(f"{spec.name}: the concept's text {self.concept_text!r} is also an alternative")
        self.top_k = int(p.get("top_k", 1))
        if not 1 <= self.top_k <= len(self.alternatives):
            raise ValueError(f"{spec.name}: top_k={self.top_k} must lie in [1, {len(self.alternatives)}] (the number "
                             f"of alternatives; top_k above it would call every image the concept)")

    @classmethod
    def preflight(cls, spec: Any, context: MetricContext = DEFAULT_CONTEXT) -> None:
        """The open_clip weights must be local (the `clip` metric's check, with this metric's name in the hint)."""
        try:
            ClipScore.preflight(spec, context)
        except ClipWeightsMissing as exc:
            raise ClipWeightsMissing(str(exc).replace("clip:", f"{spec.name}:", 1)
                                     .replace("metric.clip.", f"metric.{spec.name}.")) from None

    def classes(self) -> list[str]:
        """The class texts; index 0 is the concept."""
        return [self.template.format(c) for c in (self.concept_text, *self.alternatives)]

    def settings(self) -> dict[str, Any]:
        return {"backbone": f"{self.model_name}/{self.pretrained or 'random-init'}", "classes": self.classes(),
                "top_k": self.top_k, "rule": f"'{self.classes()[0]}' in the top {self.top_k} of "
                                             f"{len(self.classes())} texts by CLIP cosine"}

    def cosines(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, float]:
        """Cosine [N, classes] (float64) of each image with each class text, and the model's logit scale."""
        import torch
        from PIL import Image

        device = self.context.device
        net, preprocess, tokenizer = load_clip(self.model_name, self.pretrained, self.model_config, device)
        with torch.no_grad():
            txt = torch.nn.functional.normalize(net.encode_text(tokenizer(self.classes()).to(device)).float(), dim=-1)
            out = []
            for i in range(0, len(images), batch_size):
                batch = torch.stack([preprocess(Image.fromarray(im)) for im in images[i:i + batch_size]]).to(device)
                img = torch.nn.functional.normalize(net.encode_image(batch).float(), dim=-1)
                out.append((img @ txt.T).double().cpu().numpy())
            scale = float(net.logit_scale.exp()) if hasattr(net, "logit_scale") else 100.0
        return (np.concatenate(out) if out else np.zeros((0, len(self.classes())))), scale

    def judge(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        return rank_of(self.cosines(images)[0], 0) < self.top_k

    def score(self, images: np.ndarray, prompts: list[str]) -> MetricResult:
        cos, scale = self.cosines(images)
        names = self.classes()
        ranks = rank_of(cos, 0) if len(cos) else np.zeros(0, int)
        probs = softmax(scale * cos) if len(cos) else cos
        best = top_classes(cos, 1)[:, 0] if len(cos) else np.zeros(0, int)
        value, se, n = rate(ranks < self.top_k)
        per_image = [{"prompt": p, "rank": int(r), "shows": bool(r < self.top_k), "best": names[b],
                      "concept_prob": round(float(pr[0]), 6), "cos": [round(float(x), 6) for x in c]}
                     for p, r, b, pr, c in zip(prompts, ranks, best, probs, cos, strict=True)]
        return MetricResult(value, se, n, per_image, summary={"classes": names, "logit_scale": scale})
