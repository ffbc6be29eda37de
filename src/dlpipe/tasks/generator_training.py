"""The generator task's LightningModule: a GAN trained with manual optimisation (two Adam optimizers), its
checkpoint chosen by FID on the validation split, sample grids logged to MLflow as training goes.

Kept apart from the task so that the stages that do not train never import Lightning.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from dlpipe.config import OptimizerParams
from dlpipe.data.datamodules import ImageDataModule
from dlpipe.data.pixels import image_grid, to_uint8
from dlpipe.runtime import latent_vectors
from dlpipe.tasks.classifier import to_unit_float
from dlpipe.tasks.gan_quality import frechet_distance
from dlpipe.tasks.generator import GRID_SAMPLES, GRID_SEED, SCORE_SEED
from dlpipe.tasks.optim import make_optimizer, make_schedule

log = logging.getLogger("dlpipe")
WIN_ACCURACY = 0.99  # the discriminator "wins outright" in an epoch where it tells both kinds apart this well


class PooledPixels(nn.Module):
    """A stand-in judge without a trained classifier (synthetic runs): 4x4 average-pooled pixels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.num_features = 16 * channels

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(pixels.float(), 4).flatten(1).double()


class GeneratorDataModule(ImageDataModule):
    """Real images for the GAN: the raw splits (not augmented copies: the generator imitates the data),
    full training batches only (batch norm in the generator needs more than one sample)."""

    def train_dataloader(self) -> DataLoader:
        train = self.datasets["train"]
        return self._host_loader(train, shuffle=True, drop_last=len(train) > self.batch_size)


class GeneratorModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        discriminator: nn.Module,
        net_spec: dict[str, Any],
        optimizer: dict[str, Any],
        epochs: int,
        real_label: float = 0.9,
        fid_samples: int = 1000,
        grid_every: int = 5,
        d_win_epochs: int = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "discriminator"])
        self.automatic_optimization = False
        self.model = model  # latent -> pixels in [0, 1]: what export writes
        self.discriminator = discriminator
        self.latent_dim = model.latent_dim
        self.example_input_array = torch.zeros(1, self.latent_dim)
        # The judge is not a submodule: its weights belong to the classifier's checkpoint, not to this one.
        self._judge: list[nn.Module] = [PooledPixels(net_spec["kwargs"]["in_channels"])]
        self.losses = nn.ModuleDict({name: MeanMetric() for name in ("d_loss", "g_loss", "d_real_acc", "d_fake_acc")})
        self.wins_streak, self.longest_wins_streak = 0, 0
        self._real: list[torch.Tensor] = []

    def set_judge(self, judge: nn.Module) -> None:
        """The feature extractor FID is measured with (a trained classifier's penultimate layer)."""
        self._judge = [judge]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)

    def _latents(self, count: int, seed: int) -> torch.Tensor:
        return torch.from_numpy(latent_vectors(count, self.latent_dim, seed)).to(self.device)

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        real = to_unit_float(batch[0])
        g_optimizer, d_optimizer = self.optimizers()
        fake = self.model(torch.randn(len(real), self.latent_dim, device=self.device))

        # Discriminator: real images towards `real_label` (one-sided smoothing), generated ones towards 0.
        self.toggle_optimizer(d_optimizer)
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(
            real_logits, torch.full_like(real_logits, self.hparams.real_label)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        d_optimizer.zero_grad()
        self.manual_backward(d_loss)
        d_optimizer.step()
        self.untoggle_optimizer(d_optimizer)

        # Generator: its images labelled real (the non-saturating loss of Goodfellow et al., 2014).
        self.toggle_optimizer(g_optimizer)
        g_logits = self.discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
        g_optimizer.zero_grad()
        self.manual_backward(g_loss)
        g_optimizer.step()
        self.untoggle_optimizer(g_optimizer)

        self.losses["d_loss"].update(d_loss.detach())
        self.losses["g_loss"].update(g_loss.detach())
        self.losses["d_real_acc"].update((real_logits.detach() > 0).float().mean())
        self.losses["d_fake_acc"].update((fake_logits.detach() < 0).float().mean())
        return {"loss": (d_loss + g_loss).detach()}  # watched by StopOnNonFiniteLoss

    def on_train_epoch_end(self) -> None:
        values = {name: metric.compute() for name, metric in self.losses.items()}
        for name, value in values.items():
            self.log(f"train/{name}", value, prog_bar=name in ("d_loss", "g_loss"))
            self.losses[name].reset()
        won = bool(values["d_real_acc"] >= WIN_ACCURACY and values["d_fake_acc"] >= WIN_ACCURACY)
        self.wins_streak = self.wins_streak + 1 if won else 0
        self.longest_wins_streak = max(self.longest_wins_streak, self.wins_streak)
        self.log("train/d_wins_streak", float(self.wins_streak))
        if self.wins_streak == self.hparams.d_win_epochs:
            log.warning(
                "the discriminator has won outright for %d epochs (epoch %d): it tells real from generated "
                "images apart almost always, so the generator learns little; expect a high FID or collapse",
                self.wins_streak,
                self.current_epoch,
            )
        schedulers = self.lr_schedulers()  # manual optimisation steps them too
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()
        self._log_grid()

    def _log_grid(self) -> None:
        """Every `grid_every` epochs, the same 64 latents' images as one PNG in the MLflow run."""
        epoch = self.current_epoch + 1
        experiment = getattr(self.logger, "experiment", None)
        if epoch % self.hparams.grid_every or not hasattr(experiment, "log_image") or self.global_rank:
            return
        with torch.no_grad():
            self.model.eval()
            pixels = self.model(self._latents(GRID_SAMPLES, GRID_SEED)).cpu().numpy()
            self.model.train()
        experiment.log_image(
            self.logger.run_id, image_grid(to_uint8(pixels)), artifact_file=f"samples/epoch_{epoch:03d}.png"
        )

    # --------------------------------------------------------------------------------- validation, test
    def _collect(self, batch) -> None:
        self._real.append(batch[0])

    def _fid(self) -> torch.Tensor:
        real = to_unit_float(torch.cat(self._real))
        self._real.clear()
        with torch.no_grad():
            generated = torch.cat(
                [self.model(z) for z in self._latents(self.hparams.fid_samples, SCORE_SEED).split(256)]
            )
        return torch.tensor(frechet_distance(self._judge[0].to(self.device), real, generated))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        if self._real:
            self.log("val/fid", self._fid(), prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        if self._real:
            self.log("test/fid", self._fid())
        self.log("test/d_longest_wins_streak", float(self.longest_wins_streak))

    # A resumed training keeps counting where it stopped.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dlpipe_wins"] = [self.wins_streak, self.longest_wins_streak]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.wins_streak, self.longest_wins_streak = checkpoint.get("dlpipe_wins", [0, 0])

    def configure_optimizers(self):
        params = OptimizerParams(**self.hparams.optimizer)
        optimizers = [
            make_optimizer(params, self.model.parameters()),
            make_optimizer(params, self.discriminator.parameters()),
        ]
        # Named for LearningRateMonitor, which would otherwise call both `lr-Adam` and tell them apart by order.
        schedules = [
            {"scheduler": make_schedule(params, optimizer, self.hparams.epochs), "name": f"train/lr_{network}"}
            for optimizer, network in zip(optimizers, ("generator", "discriminator"), strict=True)
        ]
        return optimizers, schedules
