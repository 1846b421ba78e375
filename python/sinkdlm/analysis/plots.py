"""PNG plots of a SinkTrace: sink-position heat map over steps x positions, value-norm histograms,
and several models side by side. Uses matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from .sinks import detect_sinks


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sink_frequency(trace, *, method="ratio", epsilon=3.0, k=2.0, batch_index=0):
    """(T, L) share of (layer, head) pairs flagging each position as a sink at each step, for one
    sequence of the batch."""
    real = trace.key_padding_mask[:, None, :, None, :]
    flags = detect_sinks(trace.mass, method=method, epsilon=epsilon, k=k, key_padding_mask=real)
    return flags[:, :, batch_index].double().mean((1, 2))


def _draw_heatmap(ax, trace, title, mask_id, **criterion):
    freq = sink_frequency(trace, **criterion)
    im = ax.imshow(
        freq.numpy(),
        aspect="auto",
        cmap="magma",
        vmin=0,
        vmax=1,
        interpolation="nearest",
        origin="lower",
    )
    if mask_id is not None:  # outline where tokens were still masked
        still_masked = (trace.input_ids[:, 0] == mask_id).double().numpy()
        ax.contour(still_masked, levels=[0.5], colors="cyan", linewidths=0.6)
    ax.set_xlabel("token position")
    ax.set_ylabel("diffusion step")
    ax.set_title(title, fontsize=9)
    return im


def _draw_value_norms(ax, trace, title, **criterion):
    real = trace.key_padding_mask[:, None, :, None, :]
    flags = detect_sinks(trace.mass, key_padding_mask=real, **criterion)
    vn = trace.value_norm
    other = vn[~flags & real.expand_as(vn)]
    sinks = vn[flags]
    hi = float(vn.max()) * 1.05
    bins = torch.linspace(0, hi, 40).numpy()
    ax.hist(
        other.numpy(), bins=bins, alpha=0.6, density=True, label=f"other tokens ({other.numel()})"
    )
    if sinks.numel():
        ax.hist(
            sinks.numpy(),
            bins=bins,
            alpha=0.6,
            density=True,
            label=f"token sinks ({sinks.numel()})",
        )
    if trace.sink_value_norm.numel():
        ax.axvline(float(trace.sink_value_norm.mean()), color="k", ls="--", label="sink token")
    ax.set_xlabel("value-vector L2 norm")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_sink_heatmap(
    trace, path, *, title="sink positions", mask_id=None, method="ratio", epsilon=3.0, k=2.0
):
    """Write a PNG heat map (steps x positions): the share of (layer, head) pairs flagging each
    position as a sink, first sequence; still-masked tokens outlined if mask_id is given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    im = _draw_heatmap(ax, trace, title, mask_id, method=method, epsilon=epsilon, k=k)
    fig.colorbar(im, ax=ax, label="share of (layer, head) flagging a sink")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_value_norms(trace, path, *, title="value norms", method="ratio", epsilon=3.0, k=2.0):
    """Write a PNG histogram of value-vector norms: token sinks vs other tokens, and the designated
    sink token's norm. Returns path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    _draw_value_norms(ax, trace, title, method=method, epsilon=epsilon, k=k)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_comparison(traces: dict, path, *, mask_id=None, method="ratio", epsilon=3.0, k=2.0):
    """Write one PNG with a row per model (name -> SinkTrace): sink heat map and value-norm
    histogram side by side. Returns path."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(traces), 2, figsize=(12, 3.6 * len(traces)), dpi=110, squeeze=False
    )
    for row, (name, trace) in enumerate(traces.items()):
        im = _draw_heatmap(
            axes[row, 0],
            trace,
            f"{name}: sink positions ({method})",
            mask_id,
            method=method,
            epsilon=epsilon,
            k=k,
        )
        fig.colorbar(im, ax=axes[row, 0])
        _draw_value_norms(
            axes[row, 1], trace, f"{name}: value norms", method=method, epsilon=epsilon, k=k
        )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
