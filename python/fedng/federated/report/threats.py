"""What a run's attack and its differential privacy did, kept in `History.sim` and summed up
over seeds for the summary: the attackers and how many of their updates were rejected; the DP
noise and the ε the accountant reports for the rounds actually run."""

from __future__ import annotations

import statistics
from typing import Any

from fedng.federated.aggregation.dp import epsilon_spent
from fedng.federated.attacks import Attack
from fedng.federated.report.history import History


def record_threats(h: History, attack: Attack | None, dp: dict[str, Any] | None) -> None:
    """Writes the attack (kind, attackers, updates they sent and had rejected) and the DP
    accounting (the calibration `dp`, plus the ε spent over the rounds run) into `h.sim`."""
    if attack is not None:
        ids = {str(c) for c in attack.attackers}
        rejected = sum(len(ids & set(r.rejected)) for r in h.rounds[1:])
        h.sim["attack"] = {
            "kind": attack.kind,
            "attackers": sorted(attack.attackers),
            "sent": attack.sent,
            "rejected": rejected,
        }
    if dp is not None:
        rounds = len(h.rounds) - 1
        eps = (
            epsilon_spent(dp["noise_multiplier"], dp["delta"], rounds, dp["sampling_rate"])
            if rounds >= 1
            else 0.0
        )
        h.sim["dp"] = {**dp, "rounds": rounds, "epsilon": eps}


def attack_summary(hs: list[History]) -> dict[str, Any] | None:
    """Over seeds: the attack kind, attackers per seed, updates sent and rejected (None when no
    run was attacked)."""
    runs = [h.sim["attack"] for h in hs if "attack" in h.sim]
    if not runs:
        return None
    return {
        "kind": runs[0]["kind"],
        "attackers": [r["attackers"] for r in runs],
        "sent": sum(r["sent"] for r in runs),
        "rejected": sum(r["rejected"] for r in runs),
    }


def privacy_summary(hs: list[History]) -> dict[str, Any] | None:
    """Over seeds: the DP calibration and the largest ε spent (None without DP)."""
    runs = [h.sim["dp"] for h in hs if "dp" in h.sim]
    if not runs:
        return None
    out = {k: v for k, v in runs[0].items() if k != "epsilon"}
    out["epsilon"] = max(r["epsilon"] for r in runs)
    out["noise_multiplier"] = statistics.median(r["noise_multiplier"] for r in runs)
    return out


def threat_notes(label: str, attack: dict[str, Any] | None, dp: dict[str, Any] | None) -> list[str]:
    """One line each for the attack and the DP guarantee (empty without either)."""
    out = []
    if attack is not None:
        out.append(
            f"{label}: attack {attack['kind']} by {len(attack['attackers'][0])} client(s) per"
            f" seed; {attack['rejected']} of their {attack['sent']} updates rejected"
        )
    if dp is not None:
        out.append(
            f"{label}: client-level DP ({dp['mode']}): epsilon {dp['epsilon']:.3g} at delta"
            f" {dp['delta']:g} (RDP accountant, {dp['rounds']} rounds, sampling rate"
            f" {dp['sampling_rate']:.3g}, noise multiplier {dp['noise_multiplier']:.3g}, clip"
            f" {dp['clip']:g}, curvature clip {dp['curvature_clip']:g})"
        )
    return out
