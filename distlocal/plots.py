"""
PNG plots of results: ROC curves, confusion matrix, accuracy by stage depth (the local-learning signature).

Matplotlib with the Agg backend: works on headless cluster nodes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distlocal.classifiers import classifier_name
from distlocal.slides.region import thumbnail_step

__all__ = ["accuracy_by_depth", "attention_heatmap", "classifiers_by_epoch", "confusion_matrix", "deployed_bars",
           "inference_bars", "magnification_bars", "roc_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_curves(probs: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path, title: str) -> Path:
    """One-vs-rest ROC curve per class (one curve for two classes), with its AUROC in the legend."""
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    shown = [1] if len(classes) == 2 else range(len(classes))
    for c in shown:
        target = (labels == c).long()
        if target.min() == target.max():
            continue  # a class absent from this split has no ROC curve
        fpr, tpr, _ = binary_roc(probs[:, c].float(), target)
        auc = binary_auroc(probs[:, c].float(), target).item()
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{classes[c]} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def confusion_matrix(probs: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path, title: str) -> Path:
    """Counts of true class (rows) against predicted class (columns)."""
    plt = _pyplot()
    k = len(classes)
    counts = torch.bincount(labels.long() * k + probs.argmax(1), minlength=k * k).view(k, k)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.4, 1.2 * k + 1.8))
    ax.imshow(counts.numpy(), cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set(xticks=range(k), yticks=range(k), xticklabels=classes, yticklabels=classes, xlabel="predicted",
           ylabel="true", title=title)
    return _save(fig, path)


def accuracy_by_depth(by_split: dict[str, list[dict]], path: Path, metric: str = "acc") -> Path:
    """`metric` of A_1 .. A_{K-1} and H for each split: deeper stages should classify better."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for split, stages in by_split.items():
        k = len(stages)
        names = [classifier_name(i, k) for i in range(k)]
        ax.plot(names, [m[metric] for m in stages], marker="o", label=split)
    ax.set(xlabel="classifier (stage depth)", ylabel=metric, title=f"{metric} by stage depth", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def classifiers_by_epoch(history: list[dict], path: Path, metric: str = "auroc", best_epoch: int = -1) -> Path:
    """
    Validation `metric` of every classifier (A_1 .. A_{K-1}, H, the ensemble) per epoch: which one is right when,
    and so what predict.classifier=best chose (the best epoch is marked).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    epochs = [h["epoch"] for h in history]
    k = len(history[0]["stages"]) if history else 0
    for i in range(k):
        name = classifier_name(i, k)
        ax.plot(epochs, [h["stages"][i][metric] for h in history], marker="o", label=name,
                linewidth=2.2 if name == "H" else 1.2)
    if history and all(h.get("ensemble") for h in history):
        ax.plot(epochs, [h["ensemble"][metric] for h in history], marker="s", linestyle="--", color="black",
                label="ensemble")
    if best_epoch > 0:
        ax.axvline(best_epoch, color="grey", linestyle=":", label="best checkpoint")
    ax.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"validation {metric} of every classifier",
           ylim=None if metric == "loss" else (0, 1.02))  # a loss has no upper bound
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def attention_heatmap(image, attention: torch.Tensor, path: Path, title: str, label: str = "H attention") -> Path:
    """
    The slide (uint8 H x W x 3) beside H's attention over it: where the classifier looked. ``image`` may be the
    thumbnail already (``image[::thumbnail_step(shape), ::thumbnail_step(shape)]``: a slide read by region): its own
    step is then 1, so the picture is the same.
    """
    plt = _pyplot()
    step = thumbnail_step(image.shape[:2])
    thumb = image[::step, ::step]
    extent = (0, thumb.shape[1], thumb.shape[0], 0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6 * thumb.shape[0] / max(thumb.shape[1], 1) + 0.8))
    axes[0].imshow(thumb)
    axes[1].imshow(thumb)
    shown = axes[1].imshow(attention.float().numpy(), cmap="inferno", alpha=0.55, extent=extent,
                           interpolation="bilinear")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04, label="attention")
    for ax, name in zip(axes, ("slide (tissue crop)", label), strict=True):
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def memory_bars(report: dict, path: Path) -> Path:
    """Training-step memory of E2E and of every stage at K = 4 and K = 8, one panel per slide size."""
    plt = _pyplot()
    sizes = report["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(13 * len(sizes), 4.6), squeeze=False)
    # darker to lighter: unfolded BatchNorm, folded BatchNorm, folded + recomputed activations
    colours = {"e2e": "#333333", "k4": "#08519c", "k8": "#a63603", "e2e_fold": "#777777", "k4_fold": "#3182bd",
               "k8_fold": "#e6550d", "e2e_rc": "#bbbbbb", "k4_rc": "#9ecae1", "k8_rc": "#fdae6b"}
    tags = {"": "", "fold": "\nfold", "rc": "\nf+rc"}  # f+rc: folded and recomputed
    for ax, entry in zip(axes[0], sizes, strict=True):
        labels, values, colour = [], [], []
        for name in (n for n in colours if n in entry):
            for row in entry[name]:
                base, _, variant = name.partition("_")
                tag = tags[variant]
                labels.append(f"E2E{tag}" if base == "e2e" else f"{base.upper()}\n{row['stage']}{tag}")
                values.append(0.0 if row.get("oom") else row["model_total"] / 2**20)
                colour.append(colours[name])
        ax.bar(range(len(values)), values, color=colour)
        ax.set_xticks(range(len(values)), labels, fontsize=6)
        e2e = values[0]  # unfolded E2E at the run's precision
        for share, style in ((0.25, "--"), (0.15, ":")):
            ax.axhline(share * e2e, color="black", linestyle=style, linewidth=0.8, label=f"{share:.0%} of unfolded E2E")
        ax.set_ylabel("MB per training step")
        ax.set_title(f"{entry['size'][0]} x {entry['size'][1]} px ({report['device']})", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def stream_memory_lines(report: dict, path: Path) -> Path:
    """
    Bench memory --stream: the largest stage's bytes against the slide's pixels, streamed (measured points, computed
    lines) against E2E without streaming, with 16 GB of device memory marked.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    computed = sorted(report["computed"], key=lambda e: e["size"][0] * e["size"][1])
    pixels = [e["size"][0] * e["size"][1] for e in computed]
    for name, label, colour in (("k4", "K=4 largest stage, streamed", "#08519c"), ("e2e", "E2E, streamed", "#333333")):
        if name not in report["measured"]:
            continue
        ax.plot(pixels, [max(r["model_total"] for r in e[name]) / 1e9 for e in computed], "-", color=colour,
                label=f"{label} (computed)")
        measured = report["measured"][name]
        ax.plot([m["size"][0] * m["size"][1] for m in measured],
                [max(r["model_total"] for r in m["rows"]) / 1e9 for m in measured], "o", color=colour,
                label=f"{label} (measured)")
    ax.plot(pixels, [e["e2e_whole_gb"] for e in computed], "--", color="#a63603", label="E2E whole-slide (computed)")
    ax.plot(pixels, [e["paper_e2e_gb"] for e in computed], ":", color="#a63603", label="E2E, paper's Table 2 x pixels")
    ax.axhline(16, color="grey", linewidth=0.8, label="16 GB")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("slide pixels (the paper's three slides at 5X, 10X, 20X)")
    ax.set_ylabel("GB per training step")
    ax.set_title(f"Streamed stages, tiles of {report['tile']} px ({report['device']}, {report['precision']})",
                 fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def inference_bars(report: dict, path: Path) -> Path:
    """Seconds per slide: GABMIL's tiling / features / prediction stacked against whole-slide prediction."""
    steps = (("tiling_s", "tiling", "#bbbbbb"), ("features_s", "features", "#ff7f0e"),
             ("prediction_s", "prediction", "#1f77b4"))
    return _time_bars(report["images"], steps, (("total_s", "ours: whole-slide prediction", "#1f77b4"),),
                      "seconds per slide (from the decoded 5X image)",
                      f"Inference time, {report['backbone']} K = {report['k']} ({report['device']})", path, "GABMIL")


def deployed_bars(report: dict, path: Path) -> Path:
    """
    Seconds per slide from the file on disk: CLAM's tiling / features (tile reads, transforms, ResNet) /
    prediction stacked against our read of the 5X tissue crop and whole-slide prediction.
    """
    steps = (("tiling_s", "tiling (segmentation, grid)", "#bbbbbb"),
             ("features_s", "features (OpenSlide reads + ResNet)", "#ff7f0e"),
             ("prediction_s", "GABMIL", "#1f77b4"))
    ours = (("read_s", "ours: read to the 5X crop", "#6baed6"), ("prediction_s", "ours: prediction", "#08519c"))
    return _time_bars(report["deployed"], steps, ours, "seconds per slide, from the slide file",
                      f"From the slide file: CLAM + GABMIL against whole-slide prediction\n{report['backbone']} "
                      f"K = {report['k']} ({report['device']}, {report['workers']} loader workers)", path, "CLAM")


def _time_bars(entries: list[dict], baseline_steps: tuple, our_steps: tuple, xlabel: str, title: str, path: Path,
               baseline: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.9 * len(entries)))
    labels = []
    for i, entry in enumerate(entries):
        for row, method, steps in ((2 * i + 1, "gabmil", baseline_steps), (2 * i, "ours", our_steps)):
            left = 0.0
            for key, name, colour in steps:
                value = entry[method][key]
                ax.barh(row, value, left=left, color=colour, label=name if i == 0 else None)
                left += value
        gain = entry["speed_gain"]
        text = f"  {gain:.1f}x faster" if gain >= 1 else f"  {1 / gain:.1f}x slower"
        ax.text(entry["ours"]["total_s"], 2 * i, text, va="center", fontsize=8)
        labels += [f"ours\n{entry['name']}", f"{baseline}\n{entry['name']}"]
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()  # the first slide on top
    ax.set_xlim(0, 1.3 * max(max(e["gabmil"]["total_s"], e["ours"]["total_s"]) for e in entries))
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def magnification_bars(report: dict, path: Path) -> Path:
    """`bench magnification`: test accuracy and AUROC of each arm (5X / 10X x local / E2E), 95 % CI whiskers."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    arms = report["arms"]
    labels = [f"{a['mode']}\n{a['magnification']}X" for a in arms]
    colours = ["#9bb7d4" if a["magnification"] == 5 else "#2f5d8a" for a in arms]
    for ax, metric in zip(axes, ("acc", "auroc"), strict=True):
        values = [a[metric] for a in arms]
        errors = [[v - a[f"{metric}_ci"][0] for v, a in zip(values, arms, strict=True)],
                  [a[f"{metric}_ci"][1] - v for v, a in zip(values, arms, strict=True)]]
        ax.bar(labels, values, color=colours, yerr=errors, capsize=4)
        for seed_run in report["runs"]:
            x = next(i for i, a in enumerate(arms) if (a["mode"], a["magnification"]) ==
                     (seed_run["mode"], seed_run["magnification"]))
            ax.plot(x, seed_run[metric], "k.", ms=4)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"test {'accuracy' if metric == 'acc' else 'AUROC'} (dots: seeds)", fontsize=9)
    fig.suptitle(f"fine task: evidence one 10X pixel across ({report['slides']} slides, {report['seeds']} seeds)",
                 fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
