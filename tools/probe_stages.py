"""
Is the evidence still in each stage's features? A linear probe per stage of a trained checkpoint.

    uv run python tools/probe_stages.py runs/NAME/checkpoints/best [runs/NAME/checkpoints/last ...]

For every stage F_i the slides' output maps are pooled over positions (mean, standard deviation and maximum of each
channel: a nodule's texture raises a channel's spread and maximum even when its mean stays put), a logistic
regression is fitted on the train split and scored on the valid split. Beside it stands the stage's own classifier
(A_i or H) on the valid split. A probe that separates the classes where the stage's classifier does not says the
information is there and the classifier failed to use it (its training); a probe that fails too says the stage's
features lost it (what the earlier stages kept, or this stage's own features).
"""

from __future__ import annotations

import sys

import torch

from distlocal.classifiers import classifier_name
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.checkpoint import for_restoring, load_checkpoint
from distlocal.engine.metrics import classification_metrics
from distlocal.model import build_stages


def pooled_features(checkpoint: str) -> tuple[list, dict, list]:
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    stages = build_stages(for_restoring(cfg), len(ckpt.classes), torch.device("cpu"))
    for stage, state in zip(stages, ckpt.stages, strict=True):
        stage.load_state_dict(state)
    manifest = read_manifest(cfg.data.manifest, ckpt.classes)
    loader = SlideLoader(cfg.data, train=False)
    features: dict[str, list] = {"train": [], "valid": []}
    own, labels = [], {"train": [], "valid": []}
    for split in ("train", "valid"):
        for record, x in loader.stream(manifest.split(split)):
            per_stage, probs = [], []
            with torch.no_grad():
                for stage in stages:
                    x, p, _ = stage.eval_step(x)
                    flat = x.float().flatten(2)[0]
                    per_stage.append(torch.cat([flat.mean(1), flat.std(1), flat.amax(1)]))
                    probs.append(p)
            features[split].append(per_stage)
            labels[split].append(record.label)
            if split == "valid":
                own.append(probs)
    return features, {s: torch.tensor(v) for s, v in labels.items()}, own


def probe(train_x: torch.Tensor, train_y: torch.Tensor, classes: int):
    """L2-regularised logistic regression on standardised features (LBFGS to convergence)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    z = (train_x - mean) / std

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(z), train_y) + 1e-2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda x: torch.softmax(linear((x - mean) / std), 1)


def main(checkpoints: list[str]) -> None:
    for checkpoint in checkpoints:
        features, labels, own = pooled_features(checkpoint)
        k = len(features["train"][0])
        classes = int(labels["train"].max()) + 1
        print(f"{checkpoint}: valid split, {len(labels['valid'])} slides (accuracy / AUROC)")
        print("stage  channels  linear probe on pooled features  the stage's own classifier")
        for i in range(k):
            train_x = torch.stack([f[i] for f in features["train"]])
            valid_x = torch.stack([f[i] for f in features["valid"]])
            fitted = probe(train_x, labels["train"], classes)
            with torch.no_grad():
                predicted = fitted(valid_x)
            probed = classification_metrics(predicted, labels["valid"], classes)
            theirs = classification_metrics(torch.stack([p[i] for p in own]), labels["valid"], classes)
            print(f"F_{i + 1}    {train_x.shape[1] // 3:8d}  {probed['acc']:.3f} / {probed['auroc']:.3f}"
                  f"{'':20s}{classifier_name(i, k):<4} {theirs['acc']:.3f} / {theirs['auroc']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
