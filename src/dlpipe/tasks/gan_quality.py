"""How good a generator's images are, judged by the pipeline's own trained classifier (no Inception
weights to download): the Fréchet distance between the classifier's penultimate-layer features of
generated and real images (torchmetrics' FID with that classifier as its feature extractor), the same
distance between two real sets as the floor, a diversity ratio that exposes mode collapse, and the
classes the classifier sees in the generated images.

All images are float pixels in [0, 1], (N, C, H, W): what the classifiers take and the generator exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

FEATURE_BATCH = 256  # images per forward pass of the classifier


class PenultimateFeatures(nn.Module):
    """A trained classifier's input to its last linear layer: `forward(pixels) -> (N, num_features)`.

    The classifier runs whole (eval mode, no gradients); a forward hook on its last `nn.Linear` keeps
    that layer's input, and the logits are kept too (`last_logits`) for the class histogram.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        linears = [module for module in classifier.modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise ValueError("the feature classifier has no linear layer to read features from")
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = linears[-1].in_features  # torchmetrics reads this instead of probing 299x299 inputs
        self._captured: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        linears[-1].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._captured = inputs[0]

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.last_logits = self.classifier(pixels.float())
        return self._captured.flatten(1).double()

    def train(self, mode: bool = True) -> PenultimateFeatures:
        return super().train(False)  # always the trained classifier's inference behaviour (BN, dropout)


def _batches(images: torch.Tensor):
    for start in range(0, len(images), FEATURE_BATCH):
        yield images[start : start + FEATURE_BATCH]


def features_and_classes(extractor: PenultimateFeatures, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(N, F) float64 features and the classifier's predicted class of every image."""
    features, classes = [], []
    for batch in _batches(images):
        features.append(extractor(batch))
        classes.append(extractor.last_logits.argmax(1).cpu().numpy())
    return torch.cat(features), np.concatenate(classes)


def frechet_distances(extractor: PenultimateFeatures, real: torch.Tensor, *others: torch.Tensor) -> list[float]:
    """FID of each of `others` against `real` in the classifier's feature space (torchmetrics'
    implementation); the real set's statistics are computed once and kept between them."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor, normalize=False, reset_real_features=False)
    for batch in _batches(real):
        metric.update(batch, real=True)
    distances = []
    for images in others:
        metric.reset()  # the other set's statistics only
        for batch in _batches(images):
            metric.update(batch, real=False)
        distances.append(float(metric.compute()))
    return distances


def frechet_distance(extractor: PenultimateFeatures, real: torch.Tensor, generated: torch.Tensor) -> float:
    """FID between two image sets in the classifier's feature space."""
    return frechet_distances(extractor, real, generated)[0]


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance between all pairs of rows (a collapsed generator's samples are close)."""
    return float(torch.pdist(features.double()).mean())


@dataclass(frozen=True)
class Quality:
    fid: float  # generated vs real test images
    real_floor: float  # real training vs real test images, the same number of each: the best reachable
    diversity_ratio: float  # mean pairwise feature distance, generated over real test; about 1 is healthy
    class_counts: list[int]  # how many generated images the classifier puts in each class
    classes_drawn: int  # classes holding at least `min_class_share` of the generated images

    def metrics(self) -> dict[str, Any]:
        return {
            "fid_cnn": self.fid,
            "fid_cnn_real_floor": self.real_floor,
            "fid_cnn_over_floor": self.fid / max(self.real_floor, 1e-12),
            "diversity_ratio": self.diversity_ratio,
            "classes_drawn": self.classes_drawn,
            "class_counts": self.class_counts,
        }


def judge(
    extractor: PenultimateFeatures,
    generated: torch.Tensor,
    real_test: torch.Tensor,
    real_train: torch.Tensor,
    num_classes: int,
    min_class_share: float = 0.01,
    seed: int = 0,
) -> Quality:
    """The quality of `generated` against the real test images; the floor compares as many real training
    images (drawn with `seed`) with the same test images, so both distances carry the same sample-size bias."""
    count = min(len(generated), len(real_train))
    chosen = torch.from_numpy(np.random.default_rng(seed).choice(len(real_train), size=count, replace=False))
    train_subset = real_train[chosen]
    generated_features, generated_classes = features_and_classes(extractor, generated)
    test_features, _ = features_and_classes(extractor, real_test)
    counts = np.bincount(generated_classes, minlength=num_classes)
    fid, real_floor = frechet_distances(extractor, real_test, generated, train_subset)
    return Quality(
        fid=fid,
        real_floor=real_floor,
        diversity_ratio=mean_pairwise_distance(generated_features) / mean_pairwise_distance(test_features),
        class_counts=[int(c) for c in counts],
        classes_drawn=int((counts >= min_class_share * len(generated)).sum()),
    )
