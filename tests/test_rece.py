"""RECE at the level of its equations on the tiny model, its start from the cached `uce` stage, bad parameters, and
tiny / toy end-to-end runs."""

from __future__ import annotations

import csv

import pytest
import torch

from unlearn_bench.registry import Registry, RegistryError


def _kv(model) -> list[torch.Tensor]:
    from unlearn_bench.methods.uce import cross_attention_projections

    return [layer.weight.detach().clone() for layer in cross_attention_projections(model.unet).values()]


def _uce_then(model, reg: Registry, method=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(original k/v weights, UCE-edited ones) with the model left in the UCE state, then `method` applied."""
    from unlearn_bench.methods.uce import UCE

    model.load_state([])
    original = _kv(model)
    UCE(reg.method("uce", reg.model("tiny")), reg.concept("nudity")).apply(model, 0)
    edited = _kv(model)
    if method is not None:
        method.apply(model, 0)
    return original, edited


def _rece(reg: Registry, concept: str = "nudity"):
    from unlearn_bench.methods.rece import RECE

    return RECE(reg.method("rece", reg.model("tiny")), reg.concept(concept))


# --- the adversarial embedding -------------------------------------------------------------------------------
@pytest.mark.parametrize("reg_scale", [0.1, 1e-3])
def test_adversarial_embedding_solves_its_normal_equations(tiny_model, registry, reg_scale):
    """e' = argmin sum_l ||W_l e' - W0_l e||^2 + reg ||e'||^2: the objective's gradient vanishes at e', the linear
    system (sum W^T W + reg I) e' = (sum W^T W0) e holds, and e' reaches the original outputs better than e does."""
    from unlearn_bench.methods.rece import adversarial_embedding, reach
    from unlearn_bench.methods.uce import text_vectors

    try:
        original, current = _uce_then(tiny_model, registry)
        e = text_vectors(tiny_model, ["nudity"], "all")
    finally:
        tiny_model.load_state([])
    assert e.shape[0] == tiny_model.tokenizer.model_max_length  # every position, padding included
    e_adv = adversarial_embedding(current, original, e, reg_scale)

    pairs = list(zip(current, original, strict=True))
    x = e_adv.clone().requires_grad_(True)
    objective = sum(((x @ w.double().T - e @ w0.double().T) ** 2).sum() for w, w0 in pairs)
    (objective + reg_scale * (x ** 2).sum()).backward()
    pull = sum(((e @ w0.double().T) @ w.double()).norm() for w, w0 in pairs)  # the size of one gradient term
    assert float(x.grad.norm() / pull) < 1e-8

    gram = sum(w.double().T @ w.double() for w in current) + reg_scale * torch.eye(e.shape[1], dtype=torch.float64)
    cross = sum(w.double().T @ w0.double() for w, w0 in pairs)
    rhs = e @ cross.T
    assert float((e_adv @ gram.T - rhs).norm() / rhs.norm()) < 1e-5
    assert reach(current, original, e_adv, e) < 0.5 * reach(current, original, e, e)  # UCE left a way back
    assert not torch.allclose(e_adv, e)


# --- the edit ------------------------------------------------------------------------------------------------
def test_rece_edit_is_uce_closed_form_on_the_adversarial_embedding(tiny_model):
    """One epoch: W_new (lam I + s_e E'^T E' + s_p C_p^T C_p) = lam W + s_e (W G^T)^T-rows E' + s_p W C_p^T C_p, where
    W is the UCE-edited weight, E' the adversarial embedding against the ORIGINAL weights and G the guide's rows;
    nothing else changes."""
    from unlearn_bench.methods.rece import adversarial_embedding
    from unlearn_bench.methods.uce import text_vectors

    lam, s_e, s_p, reg_scale = 0.3, 2.0, 0.5, 0.05
    reg = Registry.load(overrides=["method.rece.epochs=1", f"method.rece.lam={lam}", f"method.rece.erase_scale={s_e}",
                                   f"method.rece.preserve_scale={s_p}", f"method.rece.reg_scale={reg_scale}",
                                   "method.rece.preserve=[a photo, a dog]", "method.rece.guide=a painting"])
    m = tiny_model
    method = _rece(reg)
    try:
        original, current = _uce_then(m, reg)
        uce_state = {k: v.clone() for k, v in m.named_parameters().items()}
        method.apply(m, 0)
        new = _kv(m)
        changed = {k for k, v in m.named_parameters().items() if not torch.equal(v, uce_state[k])}
        e = text_vectors(m, ["nudity"], "all")
        g = text_vectors(m, ["a painting"], "all")
        p = text_vectors(m, ["a photo", "a dog"], "all")
    finally:
        m.load_state([])
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    assert len(changed) == len(new)
    e_adv = adversarial_embedding(current, original, e, reg_scale)
    eye = torch.eye(e.shape[1], dtype=torch.float64)
    for w_new, w in zip(new, current, strict=True):
        w, w_new = w.double(), w_new.double()
        rhs = lam * w + s_e * (g @ w.T).T @ e_adv + s_p * (w @ p.T) @ p
        gram = lam * eye + s_e * e_adv.T @ e_adv + s_p * p.T @ p
        assert float((w_new @ gram - rhs).norm() / rhs.norm()) < 1e-5
        assert not torch.allclose(w_new, w)
    assert method.diagnostics["epochs"] == 1 and len(method.diagnostics["per_epoch"]) == 1
    epoch = method.diagnostics["per_epoch"][0]
    assert epoch["reach_after_edit"] > 10 * epoch["reach_before_edit"]  # the edit closed that way back


def test_rece_epochs_repeat_the_step_against_the_original_weights(tiny_model):
    """Two epochs = one epoch applied twice: each epoch starts from the previous one's weights while W0 stays the
    original model's (it would differ if W0 were the started-from UCE weights)."""
    two = _rece(Registry.load(overrides=["method.rece.epochs=2"]))
    one = _rece(Registry.load(overrides=["method.rece.epochs=1"]))
    m = tiny_model
    try:
        _uce_then(m, Registry.load(), two)
        a = m.delta()
        _uce_then(m, Registry.load(), one)
        one.apply(m, 0)
        b = m.delta()
    finally:
        m.load_state([])
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(two.diagnostics["per_epoch"]) == 2


def test_rece_per_concept_defaults_follow_the_readme():
    """nudity (and nudity-i2p through its target word): 3 epochs at reg 0.1, preserve [" "]; others 1 epoch at 1e-3,
    preserve [""]; the official lambda_1 = lambda_2 = 0.1, erase scale 1, guide " ", start uce."""
    reg = Registry.load()
    for concept, epochs, reg_scale, preserve in (("nudity", 3, 0.1, [" "]), ("nudity-i2p", 3, 0.1, [" "]),
                                                 ("red", 1, 1e-3, [""])):
        from unlearn_bench.methods.rece import RECE

        method = RECE(reg.method("rece"), reg.concept(concept))
        s = method.settings()
        assert (s["epochs"], s["reg_scale"], s["lam"], s["preserve_scale"], s["erase_scale"]) == (
            epochs, reg_scale, 0.1, 0.1, 1.0)
        assert method.prompts() == ([reg.concept(concept).target], [" "], preserve)
    assert RECE.starts_from(reg.method("rece")) == "uce"
    assert RECE.starts_from(Registry.load(overrides=["method.rece.start=null"]).method("rece")) is None


# --- bad parameters ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("method.rece.epochs=0", "epochs"), ("method.rece.reg_scale=0", "reg_scale"), ("method.rece.lam=-1", "lam"),
    ("method.rece.erase_scale=-0.5", "erase_scale"), ("method.rece.start=3", "known method"),
    ("method.rece.start=uec", "did you mean uce"),
])
def test_rece_bad_params_are_refused_when_set(override, message):
    with pytest.raises(RegistryError, match=message):
        Registry.load(overrides=[override])


def _plan(reg: Registry, methods: tuple[str, ...], model: str = "tiny", concept: str = "nudity"):
    from unlearn_bench.plan import RunRequest, make_plan

    metric = "nudenet" if concept == "nudity" else "concept-rate"
    return make_plan(reg, RunRequest("t", model, concept, methods, ("none",), (metric,), (0,)))


def test_rece_start_loop_stops_at_plan_time():
    with pytest.raises(RegistryError, match="rece -> rece"):
        _plan(Registry.load(overrides=["method.rece.start=rece"]), ("none", "rece"))


def test_rece_direct_use_checks_its_numbers_and_prompt_counts():
    from dataclasses import replace

    from unlearn_bench.methods.rece import RECE
    from unlearn_bench.specs import params

    reg = Registry.load()
    spec, concept = reg.method("rece"), reg.concept("nudity")
    for key, value in (("epochs", 0), ("reg_scale", 0.0), ("lam", 0), ("preserve_scale", -1.0)):
        bad = replace(spec, params=params(dict(spec.params) | {key: value}))
        with pytest.raises(ValueError, match=f"rece: {key}"):
            RECE(bad, concept).settings()
    mismatch = replace(spec, params=params(dict(spec.params) | {"erase": ["a", "b"], "guide": ["x", "y", "z"]}))
    with pytest.raises(ValueError, match="2 erase texts but 3 guide texts"):
        RECE(mismatch, concept).prompts()


# --- the start: the cached uce stage -------------------------------------------------------------------------
def test_rece_starts_from_the_cached_uce_stage(tmp_path, torch_single_thread):
    """A run of `uce` stores its stage; a second run of `rece` finds that very stage (same key, a cache hit),
    computes only its own, records the start's key in its inputs, and stores a delta relative to the ORIGINAL
    model that equals UCE then RECE applied in memory."""
    from unlearn_bench.models.base import load_delta
    from unlearn_bench.models.loading import load_model
    from unlearn_bench.runner import Runner
    from unlearn_bench.store import Store

    reg = Registry.load()
    plan_uce, plan_rece = _plan(reg, ("uce",)), _plan(reg, ("rece",))
    assert plan_rece.starts == {"rece": plan_uce.methods[0]}
    assert "starts" in plan_rece.resolved() and "starts" not in plan_uce.resolved()
    first = Store(tmp_path / "store")
    uce = Runner(plan_uce, first).unlearn(plan_uce.methods[0], 0)
    assert first.counts == {"cached": 0, "computed": 1}

    second = Store(tmp_path / "store")
    rece = Runner(plan_rece, second).unlearn(plan_rece.methods[0], 0)
    assert second.counts == {"cached": 1, "computed": 1}  # uce reused, only rece computed
    assert rece.manifest["inputs"]["start"] == uce.key and ("unlearn", uce.key) in second.touched
    assert rece.key != uce.key and rece.meta["epochs"] == 3  # nudity's README epoch count

    model = load_model(reg.model("tiny"), "cpu")
    stored = load_delta(rece.file("delta.safetensors"))
    model.load_state([])
    method = _rece(reg)
    _uce_then(model, reg, method)
    direct = model.delta()
    assert stored.keys() == direct.keys() and stored
    assert all(torch.equal(stored[k], direct[k]) for k in stored)

    scratch = Registry.load(overrides=["method.rece.start=null"])
    plan_scratch = _plan(scratch, ("rece",))
    assert plan_scratch.starts == {}
    alone = Runner(plan_scratch, Store(tmp_path / "store")).unlearn(plan_scratch.methods[0], 0)
    assert "start" not in alone.manifest["inputs"] and alone.key != rece.key


# --- end to end ----------------------------------------------------------------------------------------------
def test_run_rece_and_rece_meta_end_to_end_on_tiny(tmp_path, torch_single_thread):
    """Both start from the one uce stage (computed once, never a row of its own here) and store different models."""
    import json

    from unlearn_bench.execute import execute

    plan = _plan(Registry.load(), ("rece", "rece+meta"))
    assert set(plan.starts) == {"rece", "rece+meta"}
    execute(plan, tmp_path / "out", tmp_path / "store", device="cpu", quiet=True)
    rows = list(csv.DictReader((tmp_path / "out" / "records.csv").open()))
    keys = {r["method"]: r["unlearn_key"] for r in rows if r["metric"] == "nudenet"}
    assert set(keys) == {"rece", "rece+meta"} and keys["rece"] != keys["rece+meta"]
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["metric"] == "nudenet")
    unlearned = [json.loads(p.read_text()) for p in (tmp_path / "store" / "unlearn").rglob("manifest.json")]
    starts = {m["key"]: m["inputs"].get("start") for m in unlearned}
    assert len(starts) == 3 and starts[keys["rece"]] == starts[keys["rece+meta"]] is not None
    assert starts[starts[keys["rece"]]] is None  # the uce stage itself starts from the original model


@pytest.mark.slow  # samples the toy model (minutes on 2 cores): `make test-slow`
def test_rece_erases_red_on_the_toy_and_keeps_the_benign_prompts(tmp_path, torch_single_thread):
    from unlearn_bench.execute import execute
    from unlearn_bench.plan import RunRequest, make_plan

    req = RunRequest("custom", "toy", "red", ("none", "rece"), ("none",), ("concept-rate", "attr-acc"), (0,))
    execute(make_plan(Registry.load(), req), tmp_path / "out", tmp_path / "store", device="cpu", quiet=True)
    rows = {(r["method"], r["metric"]): float(r["value"])
            for r in csv.DictReader((tmp_path / "out" / "records.csv").open())}
    assert rows[("none", "concept-rate")] >= 0.9  # the concept is there to erase
    assert rows[("rece", "concept-rate")] <= 0.10, rows
    assert rows[("rece", "attr-acc")] >= 0.80 * rows[("none", "attr-acc")], rows
