"""The comparison's plots, as PNG bytes, drawn on matplotlib ``Figure`` objects directly: no pyplot, no display,
and importing this module leaves the user's matplotlib backend alone.

* val loss vs cumulative FLOPs and vs timed wall seconds: one line per arm (the mean over seeds at each evaluation),
  the band between its best and worst seed shaded, the target as a dashed line;
* residual gain per layer of the hc / mhc arms' final models: forward (max row sum) and backward (max column sum)
  Amax gain of each site's H_res, mean over seeds.
"""

from __future__ import annotations

import io
import statistics

from matplotlib.figure import Figure


def new_axes() -> tuple[Figure, object]:
    fig = Figure(figsize=(7, 4.5))
    return fig, fig.add_subplot()


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def loss_curves(report: dict, x_key: str, x_label: str) -> bytes:
    fig, ax = new_axes()
    for color, arm in enumerate(report["arms"]):
        runs = [r["evals"] for r in report["runs"] if r["arm"] == arm["name"]]
        n = min(len(e) for e in runs)  # all seeds of an arm evaluate at the same steps
        x = [statistics.fmean(e[i][x_key] for e in runs) for i in range(n)]
        losses = [[e[i]["val_loss"] for e in runs] for i in range(n)]
        ax.plot(x, [statistics.fmean(v) for v in losses], label=arm["name"], lw=1.5, color=f"C{color}")
        ax.fill_between(x, [min(v) for v in losses], [max(v) for v in losses], color=f"C{color}", alpha=0.2)
    ax.axhline(report["target_loss"], color="black", ls="--", lw=0.8, label=f"target {report['target_loss']:.4f}")
    finals = [r["final_val_loss"] for r in report["runs"]]
    ax.set_ylim(min(finals) - 0.1, max(finals) + 0.6)  # the interesting part: the approach to the target
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{report['comparison']}: mean over seeds, band = best to worst seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return to_png(fig)


def gains_per_layer(report: dict) -> bytes | None:
    arms = [(f"C{i}", a) for i, a in enumerate(report["arms"]) if a["stability"]["layer_gains"]]  # colors as above
    if not arms:
        return None
    fig, ax = new_axes()
    values = [g[k] for _, a in arms for g in a["stability"]["layer_gains"] for k in ("forward_max", "backward_max")]
    for color, arm in arms:
        layers = arm["stability"]["layer_gains"]
        sites = range(1, len(layers) + 1)
        ax.plot(sites, [g["forward_max"] for g in layers], marker="o", color=color, label=f"{arm['name']} forward")
        ax.plot(sites, [g["backward_max"] for g in layers], marker="x", ls="--", color=color,
                label=f"{arm['name']} backward")  # fmt: skip
    ax.axhline(1.0, color="black", lw=0.8)
    if max(values) > 10 * min(values):  # HC's gains can grow by orders of magnitude; mHC's stay near 1
        ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("residual site (2 per block: attention, FFN), bottom to top")
    ax.set_ylabel("Amax gain of H_res")
    ax.set_title("residual gain per layer, final model, mean over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return to_png(fig)


def plot_report(report: dict) -> dict[str, bytes]:
    """File name -> PNG bytes of every plot the report has data for."""
    plots = {
        "val_loss_vs_flops.png": loss_curves(report, "flops", "cumulative training FLOPs (analytic)"),
        "val_loss_vs_time.png": loss_curves(report, "wall_seconds", "timed wall-clock seconds of training"),
    }
    gains = gains_per_layer(report)
    if gains is not None:
        plots["residual_gain_per_layer.png"] = gains
    return plots
