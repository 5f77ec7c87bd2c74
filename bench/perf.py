"""`bench perf`: speed and memory, measured side by side in one process (never asserted in tests).

What it compares is what the device would really run, because a comparison a user cannot act on is noise (bf16
autocast on a CPU runs ESD at 0.05-0.6x of fp32's speed on the tiny and toy models, so "bf16 vs fp32" told a CPU
user nothing they would ever run):

- ESD iterations/s. `harness` is the shared training loop's iteration (bench.training's steps around
  methods/esd.py's loss) at the device's precision: fp32 on CPU; on CUDA bf16 autocast with a bf16 frozen teacher
  and TF32, next to the same loop in plain fp32 (fp32 teacher, no autocast, TF32 off). `reference` is a plain loop
  written here from the paper's Eq. 7 in the style of the authors' training script (text embeddings once, a
  partial DDIM trajectory from the model being trained, the frozen model's negative-guidance target, one Adam
  step), calling the diffusers UNet directly in fp32. Both draw the same step k and noise from the same seed and
  start from the same weights, so their losses must agree (printed): harness/reference is the harness's overhead.
- Images/s of the harness's sampler against diffusers' StableDiffusionPipeline on the same components, scheduler,
  noise and guidance, in fp32 (TF32 on CUDA) so the images can be compared pixel for pixel. The toy model has no
  VAE (a lossless codec): the pipeline then runs to latents and the toy codec decodes them.

Models: `tiny` and `toy` from the registry, `sd14-shaped` (an SD-1.4-shaped UNet, text encoder and VAE built from
config with random weights: no download, for GPUs), or any registry model whose weights are on this machine.
"""

from __future__ import annotations

import copy
import json
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from unlearn_bench.errors import RegistryError, suggest

SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=49407)
SD14_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
SHAPED = "sd14-shaped"
GUIDANCE = 7.5


def sd14_shaped(spec: Any, device: str) -> Any:
    """An SD-1.4-shaped DiffusionModel with seeded random weights (for speed/memory, not for images)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from unlearn_bench.models.base import DiffusionModel
    from unlearn_bench.models.codecs import VAECodec
    from unlearn_bench.models.tiny import SD1_SCHEDULER
    from unlearn_bench.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD14_UNET)
    te = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    vae = AutoencoderKL(**SD14_VAE).requires_grad_(False).eval()
    return DiffusionModel(spec, unet, te, load_clip_tokenizer(77), SD1_SCHEDULER, VAECodec(vae), device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class _Plain:
    """fp32 without TF32 for the duration (restored after): the `plain` and `reference` configurations."""

    def __init__(self, model: Any, on: bool) -> None:
        self.model, self.on = model, on

    def __enter__(self) -> None:
        import torch

        self.saved = (self.model.amp_dtype, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if self.on:
            self.model.amp_dtype = None
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        import torch

        self.model.amp_dtype, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _timed_loop(device: str, iters: int, step: Any) -> dict[str, Any]:
    """Run step() iters+1 times (the first warms kernels and allocators up); median seconds, peak GiB, losses."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(iters + 1):
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step(i))
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {"it_per_s": 1.0 / float(np.median(times[1:])), "peak_gb": peak, "losses": losses}


def time_esd(model: Any, esd_spec: Any, concept: Any, iters: int, plain: bool) -> dict[str, Any]:
    """ESD iterations/s of the harness (the shared loop's zero_grad, methods/esd.py's loss, backward, optimiser
    step); plain=True: fp32 teacher, no autocast, TF32 off. Returns it_per_s, peak_gb (nan off CUDA), losses."""
    import torch

    from unlearn_bench.methods_runtime import build_method
    from unlearn_bench.training import make_optimizer

    p = esd_spec.params
    with _Plain(model, plain):
        method = build_method(esd_spec, concept)
        model.load_state([])
        method.prepare(model, 0)
        params = list(method.trainable(model).values())
        for t in params:
            t.requires_grad_(True)
        opt = make_optimizer(str(p.get("optimizer", "adam")), params, float(p.get("lr", 1e-5)))
        gen = torch.Generator().manual_seed(0)

        def step(i: int) -> float:
            opt.zero_grad(set_to_none=True)
            loss = method.loss(model, i, gen)
            loss.backward()
            opt.step()
            return float(loss.detach())

        try:
            return _timed_loop(str(model.device), iters, step)
        finally:
            for t in params:
                t.requires_grad_(False)
                t.grad = None
            method.cleanup()
            model.load_state([])


def reference_esd(model: Any, esd_spec: Any, concept: Any, iters: int) -> dict[str, Any]:
    """A plain fp32 ESD loop from the paper's Eq. 7 (anchor = the empty prompt, trajectory sampled with the model
    being trained, as the authors' script does), on the diffusers UNet directly: what a researcher's own script
    costs. The trained parameter set is the harness's (the same variant, e.g. ESD-u), chosen before timing; the
    step k and the noise come from the same seeded generator in the same order as methods/esd.py draws them."""
    import torch
    from diffusers import DDIMScheduler

    from unlearn_bench.methods_runtime import build_method

    p = esd_spec.params
    device = model.device
    n, ddim_steps, eta, guidance = int(p["batch_size"]), int(p["ddim_steps"]), float(p["eta"]), \
        float(p["start_guidance"])
    with _Plain(model, True):
        model.load_state([])
        unet = model.unet
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()  # theta* of the paper, fp32
        params = list(build_method(esd_spec, concept).trainable(model).values())
        for t in params:
            t.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=float(p["lr"]))

        def embed(text: str) -> torch.Tensor:
            ids = model.tokenizer([text], padding="max_length", max_length=model.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(device)
            return model.text_encoder(ids)[0].expand(n, -1, -1)

        with torch.no_grad():
            c, u = embed(str(p.get("prompt") or concept.target)), embed("")
        both = torch.cat([u, c])
        sched = DDIMScheduler.from_config(model.scheduler_config)
        sched.set_timesteps(ddim_steps, device=device)
        gen = torch.Generator().manual_seed(0)

        def step(i: int) -> float:
            opt.zero_grad(set_to_none=True)
            k = int(torch.randint(0, ddim_steps, (1,), generator=gen))
            x = torch.randn((n, *model.latent_shape), generator=gen).to(device) * sched.init_noise_sigma
            with torch.no_grad():
                for t in sched.timesteps[:k]:  # x_t: k guided DDIM steps toward the concept
                    e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
                    x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
                t = sched.timesteps[k]
                e0_c = frozen(x, t, encoder_hidden_states=c).sample
                e0_u = frozen(x, t, encoder_hidden_states=u).sample
                target = e0_u - eta * (e0_c - e0_u)  # Eq. 7: negative guidance away from the concept
            loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=c).sample, target)
            loss.backward()
            opt.step()
            return float(loss.detach())

        try:
            return _timed_loop(str(device), iters, step)
        finally:
            for t in params:
                t.requires_grad_(False)
                t.grad = None
            model.load_state([])


def time_sampling(model: Any, batch: int, steps: int, guidance: float) -> dict[str, float]:
    """Images/s of the harness sampler vs diffusers' pipeline on the same components; max pixel difference.
    A model without a VAE (the toy's lossless codec) runs the pipeline to latents and decodes them with its codec,
    as the harness does."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from unlearn_bench.models.base import images_to_uint8

    device = str(model.device)
    prompts = [f"a photo number {i}" for i in range(batch)]
    seeds = list(range(batch))
    vae = getattr(model.codec, "vae", None)
    with warnings.catch_warnings():  # the toy's steps_offset=0 draws a deprecation note; trailing spacing ignores it
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                       unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def ours() -> np.ndarray:
        return model.sample(prompts, seeds, guidance=guidance, steps=steps, batch_size=batch)

    def theirs() -> np.ndarray:
        latents = model.initial_noise(seeds)
        with model.autocast():
            out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                       height=model.resolution, width=model.resolution,
                       output_type="np" if vae is not None else "latent").images
            if vae is None:
                return images_to_uint8(model.codec.decode(out))
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    result = {}
    for name, fn in (("ours", ours), ("diffusers", theirs)):
        fn()  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        images = fn()
        _sync(device)
        result[f"{name}_img_per_s"] = batch / (time.perf_counter() - t0)
        result[f"{name}_images"] = images
    diff = np.abs(result.pop("ours_images").astype(int) - result.pop("diffusers_images").astype(int)).max()
    result["max_pixel_diff"] = float(diff)
    return result


@dataclass
class PerfReport:
    """What `bench perf` measured: the setup (device, threads, model, settings) and one row per comparison."""

    setup: dict[str, Any]
    esd: list[dict[str, Any]] = field(default_factory=list)
    sampling: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (nan, e.g. GPU memory on a CPU, becomes None)."""
        def clean(row: dict[str, Any]) -> dict[str, Any]:
            return {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}

        return {"setup": self.setup, "esd": [clean(r) for r in self.esd],
                "sampling": [clean(r) for r in self.sampling]}


def load_perf_model(reg: Any, model_name: str, device: str) -> tuple[Any, Any]:
    """(spec, model) at the precision the device would run: bf16 autocast on CUDA, fp32 elsewhere."""
    from unlearn_bench.models.loading import load_model

    cuda = device.startswith("cuda")
    if model_name == SHAPED:
        spec = replace(reg.model("sd14"), name=SHAPED, precision="bf16" if cuda else "fp32")
        return spec, sd14_shaped(spec, device)
    spec = replace(reg.model(model_name), precision="bf16" if cuda else "fp32")
    return spec, load_model(spec, device)


def run_perf(model_name: str, device: str, iters: int, batch_sizes: list[int], steps: int,
             reg: Any = None) -> PerfReport:
    """Measure everything `bench perf` prints (see the module docstring)."""
    import torch

    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from unlearn_bench.registry import Registry

    reg = reg or Registry.load()
    spec, model = load_perf_model(reg, model_name, device)
    esd = reg.method("esd", reg.model("sd14") if model_name == SHAPED else reg.model(model_name))
    concept = reg.concept("nudity")
    cuda = device.startswith("cuda")
    setup = {"device": torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu", "device_arg": device,
             "threads": torch.get_num_threads(), "torch": torch.__version__, "model": model_name,
             "precision": spec.precision, "iters": iters, "sample_steps": steps, "guidance": GUIDANCE,
             "esd": {k: esd.params[k] for k in ("batch_size", "ddim_steps", "lr", "eta")}}
    from unlearn_bench.methods_runtime import build_method

    setup["esd"]["train"] = build_method(esd, concept).variant()  # the parameter set for this concept (ESD-u)
    report = PerfReport(setup)
    reference = reference_esd(model, esd, concept, iters)
    harness = time_esd(model, esd, concept, iters, plain=False)
    runs = [("harness " + ("bf16" if cuda else "fp32"), harness)]
    if cuda:
        runs.append(("harness fp32", time_esd(model, esd, concept, iters, plain=True)))
    runs.append(("reference fp32", reference))
    for name, r in runs:
        ref = np.asarray(reference["losses"])
        rel = float(np.max(np.abs(np.asarray(r["losses"]) - ref) / np.maximum(np.abs(ref), 1e-12)))
        report.esd.append({"loop": name, "it_per_s": r["it_per_s"], "s_per_it": 1.0 / r["it_per_s"],
                           "vs_reference": r["it_per_s"] / reference["it_per_s"], "loss_rel_diff": rel,
                           "peak_gb": r["peak_gb"]})
    model.amp_dtype = None  # sampling comparison in fp32 (TF32 on GPU) so the images can be identical
    for b in batch_sizes:
        r = time_sampling(model, b, steps, GUIDANCE)
        report.sampling.append({"batch": b, "harness_img_s": r["ours_img_per_s"],
                                "diffusers_img_s": r["diffusers_img_per_s"],
                                "ratio": r["ours_img_per_s"] / r["diffusers_img_per_s"],
                                "max_pixel_diff": r["max_pixel_diff"]})
    return report


def _num(value: float, digits: int = 3) -> str:
    return "-" if value != value else f"{value:.{digits}g}"  # nan (no GPU memory figure) prints as "-"


def format_report(report: PerfReport) -> str:
    """Plain aligned text under 80 columns: the setup, two tables, and what every column means."""
    s = report.setup
    esd = s["esd"]
    lines = [f"bench perf: model {s['model']} on {s['device']} ({s['device_arg']})",
             f"{s['threads']} CPU thread(s), torch {s['torch']}, precision {s['precision']}",
             f"ESD {esd['train']}, batch {esd['batch_size']}, ddim_steps {esd['ddim_steps']}, lr {esd['lr']}; "
             f"median of {s['iters']} iteration(s)", "after one warm-up iteration", "",
             f"  {'loop':<16}{'it/s':>9}{'s/it':>9}{'vs ref':>9}{'loss diff':>11}{'peak GiB':>10}"]
    for r in report.esd:
        lines.append(f"  {r['loop']:<16}{_num(r['it_per_s']):>9}{_num(r['s_per_it']):>9}"
                     f"{_num(r['vs_reference']) + 'x':>9}{r['loss_rel_diff']:>11.1e}{_num(r['peak_gb']):>10}")
    lines += ["", f"Generation: {s['sample_steps']} DDIM steps, guidance {s['guidance']}, fp32"
                  f"{' (TF32)' if s['device'] != 'cpu' else ''}, one timed run after a warm-up", "",
              f"  {'batch':>5}{'harness img/s':>15}{'diffusers img/s':>17}{'ratio':>8}{'max pixel diff':>16}"]
    for r in report.sampling:
        lines.append(f"  {r['batch']:>5}{_num(r['harness_img_s']):>15}{_num(r['diffusers_img_s']):>17}"
                     f"{_num(r['ratio']) + 'x':>8}{r['max_pixel_diff']:>16.0f}")
    lines += ["", "Columns:",
              "  harness    the shared training loop running methods/esd.py: bf16 autocast, a",
              "             bf16 teacher and TF32 on CUDA; fp32 on CPU (CPU bf16 is slower)",
              "  reference  a plain fp32 loop of ESD's Eq. 7 on the diffusers UNet (no harness)",
              "  vs ref     it/s relative to the reference: below 1x is the harness's overhead",
              "  loss diff  largest relative difference of the per-iteration losses from the",
              "             reference's (same k, noise, weights: ~0 in fp32 = same computation)",
              "  peak GiB   peak CUDA memory of the loop ('-' off CUDA)",
              "  ratio      harness img/s / diffusers' StableDiffusionPipeline img/s (same",
              "             noise, scheduler, guidance); max pixel diff: largest uint8 change"]
    return "\n".join(lines)


PERF_DEVICE = re.compile(r"cpu|cuda(?::\d+)?")


def perf_command(reg: Any, model: str, device: str, iters: int, batch_sizes: str, steps: int, threads: int,
                 as_json: bool) -> str:
    """`bench perf`: check every option (RegistryError: exit 2) before torch loads, measure, and format."""
    if not PERF_DEVICE.fullmatch(device):
        raise RegistryError(f"--device {device!r}: allowed: cpu, cuda, cuda:N (e.g. cuda:1)")
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise RegistryError(f"--batch-sizes {batch_sizes!r}: expected positive integers like 1,8")
    for option, value in (("--iters", iters), ("--steps", steps)):
        if value < 1:
            raise RegistryError(f"{option} {value}: must be >= 1")
    if threads < 0:
        raise RegistryError(f"--threads {threads}: must be >= 0 (0 = torch's default)")
    known = [SHAPED, *reg.names("models")]
    if model not in known:
        raise RegistryError(f"--model {model!r}: unknown.{suggest(model, known)} Choose from: {', '.join(known)}")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RegistryError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                            "use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    report = run_perf(model, device, iters, sizes, steps, reg)
    return json.dumps(report.as_dict(), allow_nan=False) if as_json else format_report(report)
