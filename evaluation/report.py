"""Summaries and files of an evaluation: worst case per threat model, sanity warnings, and
results.json / results.csv / results.md / eps_accuracy.png / examples.png.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid

from attacks.registry import parse_attack
from defenses.base import Defense
from engine.export import atomic_write_bytes
from evaluation.runner import Evaluator, Row

RESULTS_FORMAT = "restoration-defense-results"
ADAPTIVE = ("white-box", "bpda")
NON_ADAPTIVE = ("gray-box", "transfer", "black-box")
NORM_NAMES = {"linf": "Linf", "l2": "L2"}


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def _iterative(attack: str) -> bool:
    return parse_attack(attack).recipe.iterative


def _group(rows: Iterable[Row], key: Callable[[Row], tuple]) -> dict[tuple, list[Row]]:
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return groups


def _attacked(rows: list[Row]) -> list[Row]:
    return [row for row in rows if row.attack != "clean"]


def _clean_rows(rows: list[Row]) -> dict[str, Row]:
    """Defense label -> its clean row ("none" -> the undefended classifier's)."""
    return {row.defense: row for row in rows if row.attack == "clean"}


def _budget(row: Row) -> tuple:
    return (row.defense, row.threat, row.norm, row.eps_label)


def worst_case(rows: list[Row], dataset: str, architecture: str) -> list[dict[str, Any]]:
    """Per defense, threat, norm and epsilon: the pointwise worst case over clean and every attack
    (auto-attack #45), in RobustBench's result shape plus two fields.

    robust_acc (strict): an image counts only if it was classified right in every scoring draw of
    clean and of every attack. robust_acc_mean_draws: per image the smallest share of correct
    draws over clean and the attacks, averaged; for a randomized defense it is the larger (a bound
    from above), for a deterministic one (draws 1) the two agree."""
    cleans = _clean_rows(rows)
    summaries = []
    for (defense, threat, norm, eps_label), members in _group(_attacked(rows), _budget).items():
        scored = members + ([cleans[defense]] if defense in cleans else [])
        strict = torch.stack([row.correct_every_draw for row in scored]).amin(0).mean().item()
        mean_draws = torch.stack([row.correct for row in scored]).amin(0).mean().item()
        autoattack = [row.accuracy for row in members if row.attack == "autoattack"]
        summaries.append(
            {
                "name": defense,
                "dataset": dataset,
                "architecture": architecture,
                "threat": threat,
                "threat_model": NORM_NAMES[norm],
                "eps": eps_label,
                "n": members[0].n,
                "draws": max(row.draws for row in scored),
                "clean_acc": _percent(cleans[defense].accuracy) if defense in cleans else "nan",
                "robust_acc": _percent(strict),
                "robust_acc_mean_draws": _percent(mean_draws),
                "autoattack_acc": _percent(autoattack[0]) if autoattack else None,
                "attacks": [row.attack for row in members],
            }
        )
    return summaries


def _series(row: Row) -> tuple:
    """The rows of one curve over epsilon."""
    return (row.defense, row.threat, row.attack, row.norm)


def _tolerance(*rows: Row) -> float:
    """One image, or two standard deviations of a randomized defense's accuracy, whichever is larger."""
    return max([1 / rows[0].n] + [2 * row.accuracy_std for row in rows])


def _one_step_warnings(rows: list[Row]) -> Iterable[str]:
    for (defense, threat, _, eps), members in _group(_attacked(rows), _budget).items():
        iterative = [row for row in members if _iterative(row.attack)]
        for one_step in (row for row in members if row.attack == "fgsm"):
            if iterative and one_step.accuracy < min(row.accuracy for row in iterative) - _tolerance(
                one_step, *iterative
            ):
                yield (
                    f"{defense} / {threat} / eps {eps}: FGSM ({_percent(one_step.accuracy)}%) beats the iterative "
                    "attacks: gradients may be masked"
                )


def _threat_warnings(rows: list[Row]) -> Iterable[str]:
    adaptive = _group(
        (row for row in rows if row.threat in ADAPTIVE), lambda row: (row.defense, row.norm, row.eps_label)
    )
    for row in rows:
        best = adaptive.get((row.defense, row.norm, row.eps_label))
        if (
            row.threat in NON_ADAPTIVE
            and best
            and row.accuracy < min(r.accuracy for r in best) - _tolerance(row, *best)
        ):
            yield (
                f"{row.defense} / eps {row.eps_label}: {row.threat} {row.attack} ({_percent(row.accuracy)}%) beats "
                "every "
                f"white-box/BPDA attack ({_percent(min(r.accuracy for r in best))}%): the adaptive attacks are too weak"
            )


def _epsilon_warnings(rows: list[Row]) -> Iterable[str]:
    for (defense, threat, attack, _), members in _group(_attacked(rows), _series).items():
        members.sort(key=lambda row: row.eps)
        for smaller, larger in zip(members, members[1:]):
            if larger.accuracy > smaller.accuracy + _tolerance(smaller, larger):
                yield (
                    f"{defense} / {threat} / {attack}: accuracy rises from {_percent(smaller.accuracy)}% at eps "
                    f"{smaller.eps_label} to {_percent(larger.accuracy)}% at {larger.eps_label}: gradients may be "
                    "masked"
                )


def sanity_warnings(rows: list[Row], large_eps_rows: list[Row], zero_gradients: dict[str, float]) -> list[str]:
    """The checks of Athalye et al. (2018) and Carlini et al. (2019) that flag a broken evaluation."""
    warnings = [*_one_step_warnings(rows), *_threat_warnings(rows), *_epsilon_warnings(rows)]
    for row in large_eps_rows:
        limit = 0.05 if row.threat == "none" else 0.10
        if row.accuracy > limit:
            warnings.append(
                f"{row.defense} / {row.threat}: {_percent(row.accuracy)}% accuracy left at eps {row.eps_label} "
                f"(expected ~0): the attack does not work or gradients are masked"
            )
    for where, share in zero_gradients.items():
        if share > 0.1:
            warnings.append(f"{where}: {_percent(share)}% of images have an all-zero input gradient: use bpda")
    return warnings


def csv_text(records: list[dict[str, Any]]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return stream.getvalue()


def _markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# {meta['classifier']} on {meta['data']} (n={meta['n']}, index hash {meta['index_hash']}, seed "
        f"{meta['seed']})",
        "",
        f"Commit {meta['commit']}, {meta['device']}, {meta['date']}. Accuracy in %; EOT = gradient draws per step.",
        "",
        "| defense | threat | attack | norm | eps | steps | EOT | n | accuracy | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        spread = f" ± {_percent(row['accuracy_std'])}" if row["draws"] > 1 else ""
        lines.append(
            f"| {row['defense']} | {row['threat']} | {row['attack']} | {row['norm']} | {row['eps_label']} | "
            f"{row['steps']} "
            f"| {row['eot']} | {row['n']} | {_percent(row['accuracy'])}{spread} | {row['seconds']:.1f} |"
        )
    lines += [
        "",
        "Worst case over clean and every attack, per image. strict: right in every scoring draw of each;",
        "mean of draws: the smallest share of right draws, averaged (the two differ only when draws > 1).",
        "",
        "| defense | threat | norm | eps | clean | robust (strict) | robust (mean of draws) | draws | attacks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["worst_case"]:
        lines.append(
            f"| {case['name']} | {case['threat']} | {case['threat_model']} | {case['eps']} | {case['clean_acc']} "
            f"| {case['robust_acc']} | {case['robust_acc_mean_draws']} | {case['draws']} "
            f"| {', '.join(case['attacks'])} |"
        )
    if "examples" in results:
        shown = results["examples"]
        lines += [
            "",
            f"examples.png (rows: clean / adversarial / restored / difference scaled to +-eps): {shown['defense']} / "
            f"{shown['threat']} / {shown['attack']} at eps {shown['eps_label']}.",
        ]
    lines += ["", "Sanity checks:", ""] + [f"- WARNING: {warning}" for warning in results["warnings"]]
    if not results["warnings"]:
        lines.append("- no warnings")
    lines += [f"- skipped {s['attack']} / {s['threat']} / {s['defense']}: {s['reason']}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def _eps_plot(rows: list[Row]) -> bytes:
    """One panel per threat model: accuracy against epsilon per defense and attack, from the clean
    accuracy at epsilon 0."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    clean = {label: row.accuracy for label, row in _clean_rows(rows).items()}
    panels = {
        threat[0]: _group(members, _series)
        for threat, members in _group(_attacked(rows), lambda row: (row.threat,)).items()
    }
    columns = max(len(panels), 1)  # an evaluation whose attacks were all skipped still gets a (blank) plot
    figure, axes = pyplot.subplots(1, columns, figsize=(4.2 * columns, 4.2), sharey=True, squeeze=False)
    for axis, (threat, series) in zip(axes[0], panels.items()):
        for (defense, _, attack, norm), members in series.items():
            members.sort(key=lambda row: row.eps)
            scale = 255 if norm == "linf" else 1
            xs = [0.0] + [row.eps * scale for row in members]
            ys = [100 * clean[defense]] + [100 * row.accuracy for row in members]
            axis.plot(xs, ys, marker="o", markersize=3, label=f"{defense} / {attack}")
        axis.set_title(threat)
        axis.set_xlabel("epsilon" + (" x 255 (Linf)" if norm == "linf" else " (L2)"))
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    axes[0][0].set_ylabel("accuracy (%)")
    stream = io.BytesIO()
    figure.tight_layout()
    figure.savefig(stream, format="png", dpi=110)
    pyplot.close(figure)
    return stream.getvalue()


def example_grid(clean: Tensor, adversarial: Tensor, restored: Tensor, eps: float) -> bytes:
    """PNG of four rows: clean / adversarial / restored / difference amplified to fill [0,1].
    All (K,C,H,W) in [0,1]; the difference maps [-eps, eps] to [0, 1]. Small images are enlarged
    (nearest neighbour) to about 128 px so that the pixels can be seen."""
    from PIL import Image

    difference = ((adversarial - clean) / (2 * max(eps, 1e-12)) + 0.5).clamp(0, 1)
    tiles = torch.cat([clean, adversarial, restored, difference])
    tiles = torch.nn.functional.interpolate(tiles, scale_factor=max(1, 128 // tiles.shape[-1]), mode="nearest")
    grid = make_grid(tiles, nrow=len(clean), padding=4, pad_value=1.0)
    stream = io.BytesIO()
    Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()).save(stream, format="png")
    return stream.getvalue()


def pick_example_row(rows: list[Row]) -> Row | None:
    """The strongest adaptive attack at the largest budget (else the strongest attack there)."""
    attacked = [row for row in rows if row.attack != "clean" and row.defense != "none"] or [
        row for row in rows if row.attack != "clean"
    ]
    if not attacked:
        return None
    largest = max(row.eps for row in attacked)
    return min(
        (row for row in attacked if row.eps == largest),
        key=lambda row: (row.threat not in ("white-box", "bpda"), row.accuracy),
    )


def example_png(evaluator: Evaluator, row: Row, defenses: list[Defense]) -> bytes:
    """clean / adversarial / restored / amplified difference of the row's example images."""
    by_label = {defense.label: defense for defense in defenses}
    adversarial = row.examples.to(evaluator.images.device)
    with torch.no_grad():
        restored = by_label[row.defense](adversarial) if row.defense in by_label else adversarial
    clean = evaluator.images[evaluator.example_positions]
    return example_grid(clean.cpu(), adversarial.cpu(), restored.cpu(), row.eps)


def write_results(out: Path, results: dict[str, Any], rows: list[Row], grid_png: bytes | None) -> list[Path]:
    """Write every results file of one evaluation into `out` (atomically, one by one)."""
    written = [
        atomic_write_bytes(json.dumps(results, indent=1).encode(), out / "results.json"),
        atomic_write_bytes(csv_text(results["rows"]).encode(), out / "results.csv"),
        atomic_write_bytes(_markdown(results).encode(), out / "results.md"),
        atomic_write_bytes(_eps_plot(rows), out / "eps_accuracy.png"),
    ]
    if grid_png is not None:
        written.append(atomic_write_bytes(grid_png, out / "examples.png"))
    return written
