"""Relearning and adversarial attacks: one module each, behind attacks.base.WeightAttack or PromptAttack."""
