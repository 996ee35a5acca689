"""Pass or fail, with every reason (issue 9 §2): coverage, effect, sanity. A file that changes nothing fails."""

from __future__ import annotations

from typing import Any

from adapterzoo.verify.attach import Attached
from adapterzoo.verify.measure import NOISE_FLOOR, PIXEL_FLOOR

SHOWN = 3  # names quoted in one reason; --json lists them all under coverage


def named(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


def reference_effect(effects: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The effect judged: at multiplier 1 when it was rendered, else at the largest |m| that is not 0."""
    moving = [e for e in effects if e["multiplier"] != 0]
    if not moving:
        return None
    exact = [e for e in moving if e["multiplier"] == 1]
    return exact[0] if exact else max(moving, key=lambda e: abs(e["multiplier"]))


def _effect(attached: Attached, effects: list[dict[str, Any]]) -> str | None:
    judged = reference_effect(effects)
    if judged is None:
        return "no effect: the multiplier is 0"
    if attached.no_effect is not None:
        return f"no effect: {attached.no_effect}"
    noise, pixels = judged["noise_pred_rel_change"], judged["mean_abs_pixel_change"]
    if pixels is None:  # --quick: nothing was decoded, the noise prediction alone is judged
        if noise >= NOISE_FLOOR:
            return None
        return (f"no effect: at multiplier {judged['multiplier']:g} the noise prediction moves by {noise:.2g} "
                f"(floor {NOISE_FLOOR:g})")
    if noise >= NOISE_FLOOR and pixels >= PIXEL_FLOOR:
        return None
    return (f"no effect: at multiplier {judged['multiplier']:g} the noise prediction moves by {noise:.2g} "
            f"(floor {NOISE_FLOOR:g}) and the pixels by {pixels:.3g}/255 (floor {PIXEL_FLOOR:g})")


def judge(attached: Attached, effects: list[dict[str, Any]], identical_at_zero: bool, predictions_finite: bool,
          image_problems: list[str | None]) -> list[str]:
    """Every reason to fail, in the order a user fixes them; empty means pass."""
    reasons = list(attached.problems)
    coverage = attached.coverage
    unmatched = coverage["unmatched"]
    if unmatched:
        reasons.append(f"{len(unmatched)} key(s) land on no module of the checkpoint: {named(unmatched)}")
    idle = [path for path, calls in attached.handle.calls.items() if calls == 0]
    if idle:
        reasons.append(f"{len(idle)} of {coverage['modules_total']} patched module(s) never ran while sampling: "
                       f"{named(idle)}")
    if not identical_at_zero:
        reasons.append("multiplier 0 is not bit-identical to the model without the file: the adapter leaks")
    if not predictions_finite:
        reasons.append("the noise prediction holds NaN or inf")
    reasons += list(dict.fromkeys(p for p in image_problems if p))
    effect = _effect(attached, effects)
    if effect is not None:
        reasons.append(effect)
    return reasons
