"""`external`: an unlearned model made elsewhere, evaluated like any method (every attack, metric and seed, and
`+meta`). The registry entry names a checkpoint (params.path; bench/checkpoints.py lists the accepted layouts);
`--methods mine=path:/models/my-esd` defines such a method for one run.

Closed-form: `apply` writes the checkpoint's tensors into the loaded base model, and the runner stores
model.delta() (only the tensors that differ from the base) as the unlearn stage, so a checkpoint holding the same
weights as an in-harness method yields the identical delta and identical records. Being closed-form, `+meta`
meta-trains from the loaded weights over the tensors it changed, as Meta-Unlearning does for closed-form methods.

The stage key holds the checkpoint's content digest (set at plan time by
bench.external_methods, computed by unlearn_bench.digests), not its path;
`apply` checks the files still have that digest, so a checkpoint edited between planning and running (a long
queue, a worker started later) fails its cell instead of being stored under the old content's key.
"""

from __future__ import annotations

from typing import Any

from unlearn_bench.methods.base import Method


class External(Method):
    closed_form = True

    def apply(self, model: Any, seed: int) -> None:
        from unlearn_bench.checkpoints import detect, load_into
        from unlearn_bench.digests import fingerprint

        p, where = self.spec.params, f"method {self.spec.name}: "
        if not p.get("path"):
            raise ValueError(f"{where}no checkpoint path (params.path)")
        layout = detect(str(p["path"]), str(p.get("format") or "auto"), p.get("subfolder") or None,
                        bool(p.get("allow_pickle")), where)
        if self.spec.fingerprint and fingerprint(layout) != self.spec.fingerprint:
            raise RuntimeError(f"method {self.spec.name}: the checkpoint {layout.root} changed since the run was "
                               f"planned (content digest differs); run again to plan with its new content")
        load_into(model, layout, float(p.get("scale", 1.0)), where)
