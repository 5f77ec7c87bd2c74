"""clip: CLIP score, 100 * max(cos(image embedding, prompt embedding), 0), averaged over images (open_clip).

The text-to-image unlearning papers report prompt alignment on COCO prompts this way (ESD, UCE, SalUn, Meta-Unlearning:
"CLIP 31.09" for SD-1.4), with ViT-L/14 (OpenAI weights) as the usual backbone; others use ViT-B/32 or report the raw
cosine (0.30). Backbone and scale therefore go into every results row. Defaults: ViT-L-14 / openai, scale 100.

Weights are never downloaded at run time: a pretrained tag resolves to the file open_clip would have cached (the HF hub
cache for hub-hosted tags, ~/.cache/clip for URL tags), or `pretrained` names a local checkpoint file; a missing file
stops planning (exit 2) with the command that fetches it. `pretrained: null` builds random weights (tests only), and
`model_config` registers a JSON architecture file with open_clip (custom or tiny models).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_bench.components import DEFAULT_CONTEXT, MetricContext
from unlearn_bench.metrics.base import Metric, MetricResult


class ClipWeightsMissing(RuntimeError):
    """The CLIP checkpoint is not on this machine (planning turns this into exit status 2)."""


def _register_config(model_config: str | None) -> None:
    if not model_config:
        return
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    path = Path(os.path.expanduser(model_config))
    if not path.is_file():
        raise FileNotFoundError(f"clip: model_config {path} not found (an open_clip JSON architecture file)")
    if path.stem not in open_clip.list_models():
        open_clip.add_model_config(path)


def resolve_weights(model: str, pretrained: str | None) -> tuple[str | None, dict[str, Any]]:
    """Local checkpoint file for (architecture, tag or path) plus the tag's config (mean/std, quick_gelu).

    Why resolve it ourselves: open_clip would otherwise try the network (and hang offline) before using its cache.
    """
    if pretrained is None:
        return None, {}
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    if os.path.isfile(os.path.expanduser(pretrained)):
        return os.path.expanduser(pretrained), {}
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ClipWeightsMissing(f"clip: '{pretrained}' is neither a pretrained tag of {model} (tags: {tags}) nor a "
                                 f"checkpoint file")
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    tried, fetch = [], []
    if hub:
        from huggingface_hub import try_to_load_from_cache

        from unlearn_bench.models.loading import download_command

        repo, filename = os.path.split(hub)  # open_clip's convention: "org/name/" (default file) or "org/name/file"
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, cfg
        tried.append(f"the HF cache ({repo})")
        fetch.append(download_command(repo, names[0]))
    if url:
        local = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if local.is_file():
            return str(local), cfg
        tried.append(str(local))
        fetch.append(f"wget -P ~/.cache/clip {url}")
    how = fetch[0] if fetch else "(no download source known for this tag)"
    raise ClipWeightsMissing(
        f"clip: weights for {model}/{pretrained} are not on this machine (looked in {' and '.join(tried)}). "
        f"On a machine with internet run\n    {how}\nand copy the HF cache (or ~/.cache/clip) here, or "
        f"pass a local checkpoint: --set metric.clip.pretrained=/path/to/checkpoint.pt")


@lru_cache(maxsize=2)
def load_clip(model: str, pretrained: str | None, model_config: str | None, device: str) -> tuple[Any, Any, Any]:
    """(model, image preprocess, tokenizer), cached per process: ViT-L/14 takes seconds to build."""
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    _register_config(model_config)
    path, cfg = resolve_weights(model, pretrained)
    kwargs: dict[str, Any] = {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}  # OpenAI weights use QuickGELU
    if cfg.get("mean"):
        kwargs |= {"image_mean": tuple(cfg["mean"]), "image_std": tuple(cfg["std"])}
    net, _, preprocess = open_clip.create_model_and_transforms(
        model, pretrained=path, device=device, pretrained_image=False, pretrained_text=False, **kwargs)
    net.eval()
    return net, preprocess, open_clip.get_tokenizer(model)


def backbone_params(p: Any) -> tuple[str, str | None, str | None]:
    """(model, pretrained, model_config) of an open_clip judge's params: pretrained None/""/"none" = none."""
    pretrained = None if p.get("pretrained") in (None, "", "none") else str(p["pretrained"])
    return str(p.get("model", "ViT-L-14")), pretrained, p.get("model_config") or None


class ClipScore(Metric):
    def __init__(self, spec: Any, concept: Any) -> None:
        super().__init__(spec, concept)
        p = spec.params
        self.model_name, self.pretrained, self.model_config = backbone_params(p)
        self.scale = float(p.get("scale", 100.0))

    @classmethod
    def preflight(cls, spec: Any, context: MetricContext = DEFAULT_CONTEXT) -> None:
        """At plan time: the weights must be local (raises ClipWeightsMissing naming what to download)."""
        from unlearn_bench.compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        try:
            import open_clip  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("the clip metric needs open_clip: pip install open_clip_torch "
                               "(the project's [clip] extra)") from exc
        _register_config(spec.params.get("model_config") or None)
        pre = spec.params.get("pretrained")
        resolve_weights(str(spec.params.get("model", "ViT-L-14")), None if pre in (None, "", "none") else str(pre))

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        out["backbone"] = f"{self.model_name}/{self.pretrained or 'random-init'}"
        out["formula"] = f"{self.scale:g} * max(cos, 0)"
        return out

    def embed(self, images: np.ndarray, prompts: list[str], batch_size: int = 32) -> tuple[Any, Any]:
        import torch
        from PIL import Image

        device = self.context.device
        net, preprocess, tokenizer = load_clip(self.model_name, self.pretrained, self.model_config, device)
        img_out, txt_out = [], []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                batch = torch.stack([preprocess(Image.fromarray(im)) for im in images[i:i + batch_size]])
                img_out.append(net.encode_image(batch.to(device)).float())
                txt_out.append(net.encode_text(tokenizer(prompts[i:i + batch_size]).to(device)).float())
        img = torch.nn.functional.normalize(torch.cat(img_out), dim=-1)
        txt = torch.nn.functional.normalize(torch.cat(txt_out), dim=-1)
        return img.cpu(), txt.cpu()

    def score(self, images: np.ndarray, prompts: list[str]) -> MetricResult:
        if len(images) != len(prompts):
            raise ValueError(f"clip: {len(images)} images but {len(prompts)} prompts")
        img, txt = self.embed(images, prompts)
        cos = (img * txt).sum(-1).numpy().astype(np.float64)
        per = self.scale * np.clip(cos, 0.0, None)
        n = len(per)
        se = float(per.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        per_image = [{"prompt": p, "cos": round(float(c), 6), "clip_score": round(float(s), 4)}
                     for p, c, s in zip(prompts, cos, per, strict=True)]
        return MetricResult(float(per.mean()) if n else float("nan"), se, n, per_image)
