"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024; arXiv 2308.14761).

A closed-form edit of every cross-attention key and value projection (attn2.to_k, attn2.to_v). For each such W
(original W_0), paper Eq. 7 / official trainscripts/uce_sd_erase.py:

    W* = (lam W_0 + sum_e s_e v*_e c_e^T + sum_p s_p (W_0 c_p) c_p^T)
         (lam I + sum_e s_e c_e c_e^T + sum_p s_p c_p c_p^T)^-1

with v*_e = W_0 c_guide(e). W* is the unique minimiser of the least-squares objective

    lam ||W - W_0||_F^2 + sum_e s_e ||W c_e - v*_e||^2 + sum_p s_p ||W c_p - W_0 c_p||^2,

so the erased text embeddings c_e are projected like the guide concept's and the preserved ones (c_p) as before.

Token choice (`tokens`): "last" (default) is what the official uce_sd_erase.py does: c is the text encoder's output
at the LAST SUBJECT TOKEN of the prompt, index = (number of non-padding tokens) - 2, i.e. the token just before
<eos> (for the empty guide "" this is the <sot> position). "all" is the earlier train-erasing-closed.py variant:
every one of the max_length positions of the erase/preserve prompt is a constraint, each erase position mapped to
the guide prompt's output at the same position.

SD defaults (official uce_sd_erase.py argparse): lam 0.5, erase_scale 1, preserve_scale 1, guide "" (the script
uses "art" for concept_type art), both to_k and to_v edited. Preserve set: the official default is none; this
harness defaults to the concept's related + unrelated prompts (`preserve: null`), and `preserve: []` gives the
official behaviour. A preserve prompt that is also an erase prompt is kept in both sums, as the official script
keeps it (the least-squares edit then weighs the two constraints against each other); the unlearn stage's
diagnostics list such prompts (`preserve_also_erased`). The text embeddings are computed in fp32 whatever the
model's precision (autocast off; a bf16 encoder moved the edit by ~1% of its size), as the official fp32 edit sees
them. Named deviations: the solve runs in float64 (official: float32 torch.inverse), and the official
`--expand_prompts` templating is not implemented (list the prompts in `erase` instead).
The edit works unchanged on SDXL (its encode_prompt already concatenates both encoders' states, which is what its
attn2 projections read; both SDXL tokenizers share CLIP's BPE, so the last-token index is the same).
"""

from __future__ import annotations

from typing import Any

import torch

from unlearn_bench.methods.base import Method

TOKEN_CHOICES = ("last", "all")


def cross_attention_projections(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every attn2.to_k / attn2.to_v linear layer of the UNet, by module name."""
    return {n: m for n, m in unet.named_modules()
            if ".attn2." in f".{n}" and n.rsplit(".", 1)[-1] in ("to_k", "to_v") and isinstance(m, torch.nn.Linear)}


def last_subject_index(tokenizer: Any, text: str) -> int:
    """Position of the last token before <eos> (official: attention_mask.sum() - 2)."""
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return len(ids) - 2


@torch.no_grad()
def text_vectors(model: Any, texts: list[str], tokens: str) -> torch.Tensor:
    """The c vectors of `texts`: [len(texts), D] at the last subject token, or [len(texts) * L, D] for "all"."""
    if tokens not in TOKEN_CHOICES:
        raise ValueError(f"uce: tokens={tokens!r}; allowed: {list(TOKEN_CHOICES)}")
    if not texts:
        return torch.zeros(0, 0)
    with model.full_precision():  # fp32 embeddings under a bf16 model too: the solve is exact only on them
        hidden = model.encode_prompt(texts).hidden.detach().double()  # [N, L, D]
    if tokens == "all":
        return hidden.reshape(-1, hidden.shape[-1])
    idx = torch.tensor([last_subject_index(model.tokenizer, t) for t in texts], device=hidden.device)
    return hidden[torch.arange(len(texts), device=hidden.device), idx]


def uce_solve(w0: torch.Tensor, c_erase: torch.Tensor, v_erase: torch.Tensor, c_pres: torch.Tensor, lam: float,
              erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """Eq. 7 in float64: W* = (lam W0 + s_e V*^T C_e + s_p W0 C_p^T C_p)(lam I + s_e C_e^T C_e + s_p C_p^T C_p)^-1.

    Rows of C_e / V* / C_p are the vectors c_e, v*_e, c_p.
    """
    w0 = w0.double()
    d = w0.shape[1]
    lhs = lam * w0
    gram = lam * torch.eye(d, dtype=torch.float64, device=w0.device)
    if c_erase.numel():
        lhs = lhs + erase_scale * v_erase.T @ c_erase
        gram = gram + erase_scale * c_erase.T @ c_erase
    if c_pres.numel():
        lhs = lhs + preserve_scale * (w0 @ c_pres.T) @ c_pres
        gram = gram + preserve_scale * c_pres.T @ c_pres
    # W* gram = lhs  <=>  gram W*^T = lhs^T (gram is symmetric)
    return torch.linalg.solve(gram, lhs.T).T


@torch.no_grad()
def edit_projections(layers: dict[str, torch.nn.Linear], c_erase: torch.Tensor, c_guide: torch.Tensor,
                     c_pres: torch.Tensor, lam: float, erase_scale: float, preserve_scale: float) -> None:
    """Eq. 7 on every layer in place, each layer's W_0 being the weight it holds now and v*_e = W_0 c_guide(e) (row
    i of `c_guide` is the guide vector of erase row i). Shared with RECE, whose per-epoch edit is this same solve
    from the current (already edited) weights."""
    for layer in layers.values():
        w0 = layer.weight.detach()
        v_star = c_guide @ w0.double().T if c_guide.numel() else c_guide
        w_new = uce_solve(w0, c_erase, v_star, c_pres, lam, erase_scale, preserve_scale)
        layer.weight.copy_(w_new.to(layer.weight.dtype))


def edit_texts(method: Method, noun: str = "prompts") -> tuple[list[str], list[str], list[str]]:
    """(erase, guide, preserve) texts of a UCE-style edit (UCE, RECE) after defaults, each param read per concept:
    erase [] -> the concept's target; one guide is broadcast to every erase text; preserve null -> the concept's
    related + unrelated prompts."""
    erase = list(method.param("erase") or [method.concept.target])
    guide_raw = method.param("guide")  # per concept: {default: "", vangogh: art}
    guide_raw = "" if guide_raw is None else guide_raw
    guide = [guide_raw] if isinstance(guide_raw, str) else list(guide_raw)
    if len(guide) == 1:
        guide = guide * len(erase)
    if len(guide) != len(erase):
        raise ValueError(f"{method.spec.name}: {len(erase)} erase {noun} but {len(guide)} guide {noun} (give one or "
                         "as many)")
    pres = method.param("preserve")
    preserve = list(method.concept.role_prompts("retain")) if pres is None else list(pres)
    return erase, guide, preserve


class UCE(Method):
    closed_form = True

    def prompts(self) -> tuple[list[str], list[str], list[str]]:
        return edit_texts(self)

    def apply(self, model: Any, seed: int) -> None:
        p = self.spec.params
        tokens = str(p.get("tokens", "last"))
        lam, s_e, s_p = float(p["lam"]), float(p["erase_scale"]), float(p["preserve_scale"])
        if lam <= 0:
            raise ValueError(f"uce: lam must be > 0 (it keeps the normal equations invertible), got {lam}")
        erase, guide, preserve = self.prompts()
        c_e = text_vectors(model, erase, tokens)
        c_g = text_vectors(model, guide, tokens)
        c_p = text_vectors(model, preserve, tokens)
        layers = cross_attention_projections(model.unet)
        if not layers:
            raise ValueError("uce: the UNet has no attn2.to_k / attn2.to_v layers to edit")
        edit_projections(layers, c_e, c_g, c_p, lam, s_e, s_p)
        self.diagnostics = {"edited_layers": len(layers), "erase": erase, "guide": guide,
                            "n_preserve": len(preserve), "tokens": tokens,
                            "preserve_also_erased": [q for q in preserve if q in erase]}
