"""FID in a trained classifier's feature space (`dlpipe.tasks.gan_quality`), on a tiny project's real
images and its cnn: the features are exactly the input of the classifier's last linear layer; identical
sets are about 0 apart, a shifted or blurred copy of the test set clearly further than real training
images are (the real-vs-real floor), and the floor is below a 1-epoch DCGAN's images and far below noise;
the diversity ratio exposes a collapsed set; `judge` counts the classes drawn at the share it is given."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dlpipe.tasks.gan_quality import (
    FEATURE_BATCH,
    PenultimateFeatures,
    features_and_classes,
    frechet_distance,
    judge,
    mean_pairwise_distance,
)

NUM_CLASSES = 10


@dataclass(frozen=True)
class World:
    config: object
    extractor: PenultimateFeatures
    test: torch.Tensor  # real test images, float in [0, 1]
    train: torch.Tensor  # real training images, float in [0, 1]
    generated: torch.Tensor  # as many images as the test set from the 1-epoch DCGAN, pixels in [0, 1]


@pytest.fixture(scope="module")
def world(built_project) -> World:
    """The session's tiny project: its cnn and dcgan trained one epoch each (read only here)."""
    from dlpipe.config import load_config
    from dlpipe.data.images import load_split
    from dlpipe.data.pixels import unit_float
    from dlpipe.runtime import latent_vectors
    from dlpipe.tasks import task_of
    from dlpipe.tasks.generator import SCORE_SEED, feature_extractor

    config = load_config(built_project / "params.yaml")
    x_test, _ = load_split(config.paths.raw_images, "test")
    x_train, _ = load_split(config.paths.raw_images, "train")
    test, train = torch.from_numpy(unit_float(x_test)), torch.from_numpy(unit_float(x_train))
    generator = task_of(config, "dcgan").load_exported(config.paths.checkpoint("dcgan"))
    with torch.no_grad():
        generated = generator(torch.from_numpy(latent_vectors(len(test), generator.latent_dim, SCORE_SEED)))
    return World(config, feature_extractor(config, "dcgan"), test, train, generated)


def fid(world: World, real: torch.Tensor, other: torch.Tensor) -> float:
    return frechet_distance(world.extractor, real, other)


def floor_subset(world: World, count: int, seed: int = 0) -> torch.Tensor:
    chosen = np.random.default_rng(seed).choice(len(world.train), size=count, replace=False)
    return world.train[torch.from_numpy(chosen)]


def test_the_world_is_what_the_tests_assume(world):
    assert world.test.dtype == torch.float32 and world.test.ndim == 4
    assert float(world.test.min()) >= 0.0 and float(world.test.max()) <= 1.0
    assert len(world.test) >= 50 and len(world.train) > len(world.test)
    assert world.generated.shape == world.test.shape
    assert float(world.generated.min()) >= 0.0 and float(world.generated.max()) <= 1.0


# ------------------------------------------------------------------------------------------ features
def test_features_are_the_input_of_the_last_linear_layer(world):
    from dlpipe.tasks import task_of

    classifier = task_of(world.config, "cnn").load_exported(world.config.paths.checkpoint("cnn")).eval()
    last = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
    assert last is classifier.net.fc  # the cnn's output layer
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach().clone()))
    images = world.test[:17]
    with torch.no_grad():
        logits = classifier(images)
        # The same features by hand: standardise, convolutional blocks, the hidden layer of the head.
        net = classifier.net
        by_hand = net.head(net.features(classifier.standardize(images)))
    hook.remove()

    extractor = PenultimateFeatures(classifier)
    features = extractor(images)
    assert extractor.num_features == last.in_features == features.shape[1]
    assert features.shape == (17, last.in_features)
    assert features.dtype == torch.float64
    torch.testing.assert_close(features, seen[0].double(), rtol=0, atol=0)
    torch.testing.assert_close(features.float(), by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(extractor.last_logits, logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last(features.float()), logits, rtol=1e-5, atol=1e-5)  # the head on them
    assert float(features.abs().sum()) > 0  # not a dead (all-zero) layer


def test_features_follow_the_inference_behaviour(world):
    """Eval mode whatever torchmetrics or a caller asks: dropout and batch norm never change the features."""
    extractor = world.extractor
    images = world.test[:9]
    before = extractor(images)
    extractor.train()
    assert not extractor.training and not extractor.classifier.training
    assert not any(module.training for module in extractor.classifier.modules())
    torch.testing.assert_close(extractor(images), before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in extractor.parameters())


def test_a_classifier_without_a_linear_layer_is_refused():
    with pytest.raises(ValueError, match="no linear layer"):
        PenultimateFeatures(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))


def test_features_and_classes_batches_like_one_pass(world):
    images = torch.cat([world.test] * (FEATURE_BATCH // len(world.test) + 2))  # more than one batch
    assert len(images) > FEATURE_BATCH
    features, classes = features_and_classes(world.extractor, images)
    assert features.shape == (len(images), world.extractor.num_features)
    assert classes.shape == (len(images),)
    one = world.extractor(world.test)
    torch.testing.assert_close(features[: len(world.test)], one, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(features[-len(world.test) :], one, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(classes[: len(world.test)], world.extractor.last_logits.argmax(1).numpy())


# ------------------------------------------------------------------------------------------------ FID
@pytest.fixture(scope="module")
def distances(world) -> dict[str, float]:
    test = world.test
    return {
        "identical": fid(world, test, test.clone()),
        "shifted": fid(world, test, torch.roll(test, shifts=(3, 3), dims=(2, 3))),
        "blurred": fid(world, test, F.avg_pool2d(test, kernel_size=3, stride=1, padding=1)),
        "floor": fid(world, test, floor_subset(world, len(test))),  # as many training images as test ones
        "generated": fid(world, test, world.generated),
        "noise": fid(world, test, torch.rand(test.shape, generator=torch.Generator().manual_seed(0))),
    }


def test_fid_numbers(distances, capsys):
    with capsys.disabled():  # shown with -s: the numbers the report quotes
        print("\nFID in the cnn's feature space:", {k: round(v, 4) for k, v in distances.items()})
    assert all(np.isfinite(v) for v in distances.values())


def test_fid_of_identical_sets_is_about_zero(distances):
    # Numerical noise only: under 1% of the smallest real change measured here (a 3-pixel shift).
    assert abs(distances["identical"]) < 0.01 * distances["shifted"]
    assert abs(distances["identical"]) < 1e-3


def test_fid_is_symmetric(world):
    shifted = torch.roll(world.test, shifts=(3, 3), dims=(2, 3))
    assert fid(world, world.test, shifted) == pytest.approx(fid(world, shifted, world.test), rel=1e-6)


def test_shifted_and_blurred_sets_are_clearly_above_the_real_floor(distances):
    assert distances["floor"] > 0
    # Other real digits are closer than the same digits moved by 3 pixels or blurred: twice the floor at least.
    assert distances["shifted"] > 2 * distances["floor"]
    assert distances["blurred"] > 2 * distances["floor"]


def test_fid_grows_with_the_shift(world, distances):
    one = fid(world, world.test, torch.roll(world.test, shifts=(1, 1), dims=(2, 3)))
    assert distances["identical"] < one < distances["shifted"]


def test_real_floor_is_below_generated_and_far_below_noise(distances):
    assert distances["floor"] < distances["generated"]
    assert distances["generated"] < distances["noise"]
    assert distances["noise"] > 10 * distances["floor"]


# ------------------------------------------------------------------------------------------ diversity
def test_diversity_of_a_collapsed_set_is_zero(world):
    collapsed = world.test[:1].repeat(len(world.test), 1, 1, 1)
    quality = judge(world.extractor, collapsed, world.test, world.train, NUM_CLASSES)
    assert quality.diversity_ratio == pytest.approx(0.0, abs=1e-9)
    # One image is one class, whatever the classifier thinks it is.
    assert quality.classes_drawn == 1
    assert sorted(quality.class_counts)[-1] == len(world.test)


def test_diversity_of_the_test_set_against_itself_is_one(world):
    quality = judge(world.extractor, world.test, world.test, world.train, NUM_CLASSES)
    assert quality.diversity_ratio == pytest.approx(1.0, rel=1e-9)
    assert abs(quality.fid) < 1e-3
    features, _ = features_and_classes(world.extractor, world.test)
    distances = torch.cdist(features, features)
    pairs = distances[torch.triu_indices(len(features), len(features), offset=1).unbind()]
    assert mean_pairwise_distance(features) == pytest.approx(float(pairs.mean()), rel=1e-9)


def test_mean_pairwise_distance_by_hand():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    assert mean_pairwise_distance(points) == pytest.approx((5 + 10 + 5) / 3)


# ------------------------------------------------------------------------------------------------ judge
def test_judge_matches_its_parts(world):
    quality = judge(world.extractor, world.generated, world.test, world.train, NUM_CLASSES, seed=5)
    assert quality.fid == pytest.approx(fid(world, world.test, world.generated), rel=1e-9)
    # The floor: as many training images as generated ones, drawn with the seed.
    assert quality.real_floor == pytest.approx(fid(world, world.test, floor_subset(world, len(world.generated), 5)))
    assert quality.real_floor < quality.fid
    generated_features, generated_classes = features_and_classes(world.extractor, world.generated)
    test_features, _ = features_and_classes(world.extractor, world.test)
    ratio = mean_pairwise_distance(generated_features) / mean_pairwise_distance(test_features)
    assert quality.diversity_ratio == pytest.approx(ratio, rel=1e-9)
    assert len(quality.class_counts) == NUM_CLASSES
    assert sum(quality.class_counts) == len(world.generated)
    assert quality.class_counts == np.bincount(generated_classes, minlength=NUM_CLASSES).tolist()
    metrics = quality.metrics()
    assert metrics["fid_cnn"] == quality.fid and metrics["fid_cnn_real_floor"] == quality.real_floor
    assert metrics["fid_cnn_over_floor"] == pytest.approx(quality.fid / quality.real_floor)


def test_classes_drawn_counts_classes_at_one_percent_share(world):
    """200 images: 197 of one class, 2 of another (exactly 1%: drawn), 1 of a third (0.5%: not drawn)."""
    _, classes = features_and_classes(world.extractor, world.test)
    predicted = np.bincount(classes, minlength=NUM_CLASSES)
    assert (predicted > 0).sum() >= 3, "the tiny cnn should tell at least three classes apart"
    major, middle, minor = (int(c) for c in np.argsort(-predicted)[:3])

    def image_of(label: int) -> torch.Tensor:
        return world.test[int(np.flatnonzero(classes == label)[0])][None]

    generated = torch.cat([image_of(major).repeat(197, 1, 1, 1), image_of(middle).repeat(2, 1, 1, 1), image_of(minor)])
    quality = judge(world.extractor, generated, world.test, world.train, NUM_CLASSES)
    assert sum(quality.class_counts) == 200
    assert quality.class_counts[major] == 197
    assert quality.class_counts[middle] == 2
    assert quality.class_counts[minor] == 1
    assert quality.classes_drawn == 2
    # A lower share counts the third one too; a higher one keeps only the major class.
    assert judge(world.extractor, generated, world.test, world.train, NUM_CLASSES, 0.005).classes_drawn == 3
    assert judge(world.extractor, generated, world.test, world.train, NUM_CLASSES, 0.02).classes_drawn == 1


def test_judge_floor_uses_at_most_the_training_images_there_are(world):
    """More generated images than training ones: the floor uses all training images, once each."""
    many = world.generated.repeat(len(world.train) // len(world.generated) + 1, 1, 1, 1)
    assert len(many) > len(world.train)
    quality = judge(world.extractor, many, world.test, world.train, NUM_CLASSES)
    assert quality.real_floor == pytest.approx(fid(world, world.test, world.train), rel=1e-6)
    assert sum(quality.class_counts) == len(many)
