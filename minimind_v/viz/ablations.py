"""Chapter 08's picture of the ablations: overall accuracy of each pair, and what moved per type."""

from __future__ import annotations

import numpy as np

from ..ablations import standard_error, table_rows


def plot_ablations(results: dict):
    """Left: each ablation's overall held-out accuracy, the recipe's (grey) and the variant's
    (coloured), with two standard errors either side. Right: the change per answer type, in
    points, red where the variant is worse."""
    import matplotlib.pyplot as plt

    rows = table_rows(results)
    if not rows:
        raise ValueError("no ablation has finished yet: nothing to draw")
    types = list(results["recipe"]["per_type"])
    labels = [f"{r['choice']}:\n{r['variant_value']}" for r in rows]
    y = np.arange(len(rows))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.75 * len(rows) + 1.6),
                                      gridspec_kw={"width_ratios": [1, 1.25]})
    n = results["recipe"]["n"]
    recipe = results["recipe"]["overall"]
    left.axvline(100 * recipe, color="#a0aec0", lw=1, zorder=0)
    left.axvspan(100 * (recipe - 2 * standard_error(recipe, n)), 100 * (recipe + 2 * standard_error(recipe, n)),
                 color="#e2e8f0", zorder=0, label="the recipe ± 2 standard errors")
    for yi, row in zip(y, rows):
        colour = "#2f855a" if row["delta"] > 0 else "#c53030"
        colour = colour if row["beyond_noise"] else "#718096"
        left.annotate("", xy=(100 * row["variant"], yi), xytext=(100 * row["recipe"], yi),
                      arrowprops=dict(arrowstyle="->", color=colour, lw=1.5))
        left.errorbar(100 * row["variant"], yi, xerr=200 * standard_error(row["variant"], n), fmt="o",
                      color=colour, capsize=3)
        left.text(100 * row["variant"], yi + 0.22, f"{100 * row['delta']:+.1f}", ha="center", fontsize=8, color=colour)
    left.set_yticks(y, labels, fontsize=8)
    left.set_xlabel("held-out accuracy, % (the variant; the arrow starts at the recipe)")
    left.set_xlim(0, 100)
    left.legend(loc="lower left", fontsize=8)
    deltas = np.array([[100 * ((row["per_type"][t][1] or 0) - row["per_type"][t][0]) for t in types] for row in rows])
    limit = max(10.0, float(np.abs(deltas).max()))
    image = right.imshow(deltas, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), value in np.ndenumerate(deltas):
        right.text(j, i, f"{value:+.0f}", ha="center", va="center", fontsize=8)
    right.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
    right.set_yticks([])
    right.set_title("change per answer type, points", fontsize=9)
    fig.colorbar(image, ax=right, fraction=0.04, label="variant − recipe, points")
    fig.suptitle(f"One choice changed at a time (recipe: {100 * recipe:.1f}% on {n} held-out questions)", fontsize=10)
    fig.tight_layout()
    return fig
