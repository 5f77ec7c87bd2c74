"""`+meta`: the first-order meta gradient equals its definition; second order agrees with finite differences;
`X+meta` composes with every registered method; diagnostics become metric rows."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from unlearn_bench.methods_runtime import build_method, run_method
from unlearn_bench.specs import params


def _data_for(method, model, seed=0):
    """Generate the image sets a method asks for with the tiny model (what the runner's data stage does)."""
    from unlearn_bench.data import ImageSet
    from unlearn_bench.models.base import sample_seed

    sets = {}
    for role, req in method.data_requests().items():
        caps = req.captions()
        imgs = model.sample(caps, [sample_seed(role, i) for i in range(len(caps))], steps=2)
        sets[role] = ImageSet(imgs, caps)
    return sets


@pytest.fixture
def meta_esd(tiny_model, registry):
    tiny_model.load_state([])
    spec = registry.method("esd-x+meta", registry.model("tiny"))
    method = build_method(spec, registry.concept("nudity"))
    method.data = _data_for(method, tiny_model)
    tiny_model.snapshot()
    method.prepare(tiny_model, 0)
    yield method
    method.cleanup()
    tiny_model.load_state([])


def test_first_order_meta_gradient_matches_its_definition(tiny_model, meta_esd):
    m = tiny_model
    batch = meta_esd.draw(m, torch.Generator().manual_seed(1))
    got = meta_esd.meta_gradient(m, batch)
    # the definition, computed directly: AdamW steps on a copy over the forget batches, then minus the gradient of
    # sum_r gamma2_r L(theta_FT; r) w.r.t. the copy's parameters
    p = meta_esd.spec.params
    copy_unet = copy.deepcopy(m.unet).requires_grad_(True)
    opt = torch.optim.AdamW(copy_unet.parameters(), lr=p["inner_lr"], weight_decay=p["inner_wd"])
    sched = m.noise_scheduler()
    for lat, cond, nt in batch.inner:
        opt.zero_grad()
        m.denoising_loss(lat, cond, scheduler=sched, unet=copy_unet, noise_t=nt).backward()
        torch.nn.utils.clip_grad_norm_(copy_unet.parameters(), p["inner_clip"])
        opt.step()
    opt.zero_grad()
    # the official accumulation: one backward per test batch of each role, each scaled by its gamma
    for r, g in zip(("forget", "related", "unrelated"), p["gamma2"], strict=True):
        assert len(batch.outer[r]) == 2  # 4 test images at batch 2: the sum runs over both batches
        for lat, cond, nt in batch.outer[r]:
            (g * m.denoising_loss(lat, cond, scheduler=sched, unet=copy_unet, noise_t=nt)).backward()
    names = list(meta_esd.trainable(m))
    assert names and all(".attn2." in n for n in names)
    sub = dict(copy_unet.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n], -sub[n.removeprefix("unet.")].grad, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_second_order_agrees_with_finite_differences(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    spec = registry.method("esd-x+meta", registry.model("tiny"))
    wrapper = replace(spec.wrappers[0], params=params(dict(spec.wrappers[0].params) | {"order": 2,
                                                                                       "inner_lr": 1e-3}))
    method = build_method(replace(spec, wrappers=(wrapper,)), registry.concept("nudity"))
    method.data = _data_for(method, m)
    m.snapshot()
    method.prepare(m, 0)
    unet64 = m.unet.double()
    try:
        for role in method.roles.values():
            for split in (role.train, role.test):
                split.latents = split.latents.double()
                split.cond = replace(split.cond, hidden=split.cond.hidden.double())
        batch = method.draw(m, torch.Generator().manual_seed(2))
        batch.inner = [(lat, cond, (nt[0].double(), nt[1])) for lat, cond, nt in batch.inner]
        batch.outer = {k: [(lat, cond, (nt[0].double(), nt[1])) for lat, cond, nt in v]
                       for k, v in batch.outer.items()}
        grads = method.meta_gradient(m, batch)
        name = next(iter(grads))
        param = m.named_parameters()[name]
        direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(3), dtype=param.dtype)

        def objective() -> float:
            cur = dict(unet64.named_parameters())
            cur = {k: v.detach().requires_grad_(True) for k, v in cur.items()}
            from unlearn_bench.methods.meta import _Functional

            for lat, cond, nt in batch.inner:
                loss = m.denoising_loss(lat, cond, scheduler=method.scheduler, unet=_Functional(unet64, cur),
                                        noise_t=nt)
                gs = torch.autograd.grad(loss, list(cur.values()))
                cur = {k: (v - 1e-3 * g).detach().requires_grad_(True) for (k, v), g in zip(cur.items(), gs,
                                                                                          strict=True)}
            return float(method._outer_loss(m, _Functional(unet64, cur), batch).detach())

        eps = 1e-4
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
        ctx.__enter__()
        with torch.no_grad():
            param.add_(eps * direction)
        plus = objective()
        with torch.no_grad():
            param.sub_(2 * eps * direction)
        minus = objective()
        with torch.no_grad():
            param.add_(eps * direction)
        ctx.__exit__(None, None, None)
        finite = (plus - minus) / (2 * eps)
        analytic = -float((grads[name] * direction).sum())  # meta_gradient is minus d outer / d theta
        assert analytic == pytest.approx(finite, rel=1e-3, abs=1e-9)
    finally:
        method.cleanup()
        m.unet.float()
        m.load_state([])


def test_meta_batches_follow_the_official_loaders(tiny_model, meta_esd):
    """The simulated attack is one shuffled epoch over the forget TRAIN split (every image once); the ascent and the
    retain terms run over every batch of the TEST splits, in order (the official loaders do not shuffle them)."""
    m = tiny_model
    batch = meta_esd.draw(m, torch.Generator().manual_seed(7))
    forget = meta_esd.roles["forget"]
    seen = torch.cat([lat for lat, _, _ in batch.inner])
    assert len(batch.inner) == 2 and len(seen) == len(forget.train)
    key = lambda t: sorted(map(tuple, t.flatten(1)[:, :8].tolist()))  # noqa: E731 - rows as sortable tuples
    assert key(seen) == key(forget.train.latents)
    for role, batches in [*batch.outer.items(), *batch.retain.items()]:
        test = meta_esd.roles[role].test
        torch.testing.assert_close(torch.cat([lat for lat, _, _ in batches]), test.latents)


def test_meta_terms_are_summed_over_test_batches(tiny_model, meta_esd):
    """Each gamma term is the sum of per-batch mean losses (the official per-batch backward), not one batch's mean:
    the retain loss equals gamma1 x that sum computed by hand."""
    m = tiny_model
    batch = meta_esd.draw(m, torch.Generator().manual_seed(8))
    sched = meta_esd.scheduler
    g_unrel, g_rel = meta_esd.spec.params["gamma1"]
    with torch.no_grad():
        by_hand = sum(g * m.denoising_loss(lat, cond, scheduler=sched, noise_t=nt)
                      for role, g in (("unrelated", g_unrel), ("related", g_rel))
                      for lat, cond, nt in batch.retain[role])
        got = meta_esd.retain_loss(m, batch)
        one_batch = sum(g * m.denoising_loss(*batch.retain[role][0][:2], scheduler=sched,
                                             noise_t=batch.retain[role][0][2])
                        for role, g in (("unrelated", g_unrel), ("related", g_rel)))
    assert float(got) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(got) > 1.5 * float(one_batch)  # two batches per role: about twice one batch's mean


def test_esd_meta_uses_the_official_meta_scripts_esd_settings(registry):
    """esd+meta on SD trains ESD as esd_meta.sh does (full UNet, eta 3, 1500 steps); the named variants keep
    theirs."""
    sd = registry.model("sd14")
    spec = registry.method("esd+meta", sd)
    assert (spec.params["train"], spec.params["eta"], spec.params["iterations"]) == ("esd-all", 3.0, 1500)
    assert registry.method("esd", sd).params["train"]["default"] == "esd-u"
    assert registry.method("esd-u-1+meta", sd).params["train"] == "esd-u"
    assert registry.method("esd+meta-control", sd).params["eta"] == 3.0  # the control trains the same inner method


@pytest.mark.parametrize("name", ["none", "esd", "esd-x", "esd-u", "esd-all", "uce", "salun", "advunlearn", "fmn",
                                  "sdd", "rece", "erasediff", "scissorhands", "ca"])
def test_meta_composes_with_every_method(tiny_model, registry, name):
    if name not in registry.names("methods"):
        pytest.skip(f"{name} is not registered yet")
    m = tiny_model
    m.load_state([])
    spec = registry.method(f"{name}+meta", registry.model("tiny"))
    assert spec.wrappers[0].name == "meta" and spec.module == registry.method(name).module
    method = build_method(spec, registry.concept("nudity"))
    result = run_method(m, spec, registry.concept("nudity"), 0, data=_data_for(method, m))
    assert result["history"] and all(torch.isfinite(torch.tensor(result["history"])))
    diag = result["diagnostics"]
    assert {"grad_dot_start", "grad_dot_end"} <= set(diag)
    assert m.delta()  # something was trained
    m.load_state([])


def test_bench_run_esd_and_esd_meta_on_tiny(tmp_path):
    import csv
    import os
    import subprocess
    import sys

    env = os.environ | {"BENCH_CACHE": str(tmp_path / "store"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unlearn_bench", "run", "--model", "tiny", "--concept", "nudity",
           "--methods", "esd,esd+meta", "--attacks", "ft-lr1e-5", "--metrics", "nudenet", "--seeds", "0",
           "--out", str(tmp_path / "out"), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "records.csv").open()))
    diag = {(r["method"], r["metric"]) for r in rows if r["metric"].startswith("meta-")}
    assert diag == {("esd+meta", "meta-grad-dot-start"), ("esd+meta", "meta-grad-dot-end")}
    assert {r["method"] for r in rows if r["metric"] == "nudenet"} == {"esd", "esd+meta"}


def test_meta_control_is_the_same_objective_without_the_simulated_attack(tiny_model, registry, monkeypatch):
    """`+meta-control` keeps +meta's data, retain terms and random stream but never simulates the attack: its loss
    equals +meta's loss value (the surrogate is value-neutral) and it never calls meta_gradient."""
    from unlearn_bench.methods.meta import Meta

    m = tiny_model
    m.load_state([])
    losses = {}
    calls: list[int] = []
    real = Meta.meta_gradient
    monkeypatch.setattr(Meta, "meta_gradient", lambda self, *a: calls.append(1) or real(self, *a))
    for wrapper in ("meta", "meta-control"):
        spec = registry.method(f"esd-x+{wrapper}", registry.model("tiny"))
        assert spec.wrappers[0].name == wrapper
        method = build_method(spec, registry.concept("nudity"))
        method.data = _data_for(method, m)
        m.snapshot()
        method.prepare(m, 0)
        calls.clear()
        losses[wrapper] = float(method.loss(m, 0, torch.Generator().manual_seed(3)))
        assert calls == ([1] if wrapper == "meta" else [])
        method.cleanup()
        m.load_state([])
    assert losses["meta-control"] == pytest.approx(losses["meta"], rel=1e-5)
