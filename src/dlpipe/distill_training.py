"""Training one student for the distill stage: the classifier's LightningModule with the soft-target loss.

Kept apart from `dlpipe.distill` (as `tasks/classifier_training.py` is from the task) so that reading the
distillation loss or the comparison table never imports Lightning.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dlpipe.config import Config, DistillParams
from dlpipe.data.datamodules import ImageDataModule
from dlpipe.distill import distillation_loss
from dlpipe.models import get_model
from dlpipe.models.layers import AuxiliaryOutput
from dlpipe.tasks.classifier import to_unit_float
from dlpipe.tasks.classifier_training import ClassifierModule
from dlpipe.tasks.profiles import shared_precision


class DistillationModule(ClassifierModule):
    """`ClassifierModule` whose training loss is `distillation_loss` against a frozen teacher's logits.

    Training batches are (images, labels) or (images, labels, teacher logits): with the logits given (see
    `with_teacher_logits`) the teacher is not run at all, otherwise the frozen teacher computes them.
    The teacher is held outside the module tree: it is not a submodule, so its weights are neither in
    `state_dict()` (the student's checkpoint) nor in `parameters()` (the optimizer, the parameter count),
    and `trainer.fit` switching the module to train mode leaves it in eval mode (batch-norm statistics
    and dropout stay as trained). Validation and test steps are the parent's: plain cross-entropy, so
    their losses compare with a student trained without a teacher.
    """

    def __init__(
        self,
        model: nn.Module,
        net_spec: dict[str, Any],
        num_classes: int,
        optimizer: dict[str, Any],
        epochs: int,
        temperature: float,
        alpha: float,
    ) -> None:
        # The teacher is not an argument: Lightning would store every constructor argument in the
        # checkpoint's hyperparameters (a whole network, pickled). `set_teacher` attaches it.
        super().__init__(model, net_spec, num_classes, optimizer, epochs)
        self.teacher: nn.Module | None = None

    def set_teacher(self, teacher: nn.Module) -> DistillationModule:
        teacher = teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # bypass nn.Module registration (see the class doc)
        return self

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def model_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.training:
            return super().model_step(batch[:2])
        images, labels, *given = batch
        pixels = to_unit_float(images)  # (B, C, H, W) in [0, 1]: both networks standardise inside
        output = self.model(pixels)
        logits = output.logits if isinstance(output, AuxiliaryOutput) else output  # (B, classes)
        if given:
            teacher_logits = given[0]  # (B, classes), computed before training
        elif self.teacher is None:
            raise RuntimeError("DistillationModule: batches without teacher logits need set_teacher()")
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(pixels)  # (B, classes)
        loss = distillation_loss(logits, teacher_logits, labels, self.hparams.temperature, self.hparams.alpha)
        if isinstance(output, AuxiliaryOutput):  # side heads learn from the labels, as in plain training
            loss = loss + output.aux_weight * sum(self.loss(aux, labels) for aux in output.aux_logits)
        return loss, logits.argmax(dim=1), labels


@torch.inference_mode()
def with_teacher_logits(datamodule: ImageDataModule, teacher: nn.Module, batch_size: int = 500) -> None:
    """Make the training split yield (images, labels, teacher logits).

    The augmented training images are fixed files (augmentation happens in the augment stage) and the
    teacher is frozen in eval mode, so its logits for an image are the same every epoch: computed once
    here, they cost one teacher pass instead of one per epoch. The split's order and length are kept, so
    the shuffled batches are the same images as without them.
    """
    datamodule.setup()
    images, labels = datamodule.datasets["train"].tensors[:2]
    teacher = teacher.eval()
    logits = torch.cat([teacher(to_unit_float(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])
    datamodule.datasets["train"] = TensorDataset(images, labels, logits)


def train_student(
    config: Config, data_kwargs: dict[str, Any], wrap, teacher: nn.Module | None
) -> tuple[nn.Module, dict[str, Any], float]:
    """Train `distill.student` for `distill.epochs`, with the teacher's soft targets or (None) the labels alone.

    Both calls start from the same seed, so they build the same initial weights and draw the same batches
    in the same order; only the loss differs. `wrap` is the task's (network -> exported module). Returns
    the trained exported module (CPU, eval mode), its checkpoint (Lightning's layout: `state_dict` and
    `hyper_parameters`, loadable by the classifier's `load_exported`) and the training time in seconds.
    There is no validation loop and no early stopping: a fixed budget is the comparison.
    """
    params: DistillParams = config.params.distill
    L.seed_everything(config.params.seed, workers=True, verbose=False)
    datamodule = ImageDataModule(
        config.paths.raw_images, config.paths.augmented, params.batch_size, config.params.trainer.num_workers
    )
    kwargs = {**data_kwargs, **params.net}
    network = wrap(get_model(params.student, **kwargs), kwargs)
    pixels = to_unit_float(datamodule.train_images())
    network.standardize.set_stats(pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3)))
    net_spec = {"name": params.student, "kwargs": kwargs}
    optimizer = params.optimizer.model_dump(exclude_unset=True)
    num_classes = data_kwargs["num_classes"]
    started = time.perf_counter()  # the distilled student's time includes its one pass of the teacher
    if teacher is None:
        module = ClassifierModule(network, net_spec, num_classes, optimizer, params.epochs)
    else:
        module = DistillationModule(
            network, net_spec, num_classes, optimizer, params.epochs, params.temperature, params.alpha
        ).set_teacher(teacher)
        with_teacher_logits(datamodule, teacher)
    trainer = L.Trainer(
        max_epochs=params.epochs,
        accelerator=config.params.trainer.accelerator,
        devices=1,  # a small student: one device (DDP would start the whole stage again in each process)
        precision=shared_precision(config.params.trainer),
        logger=False,  # the stage logs one MLflow run for the whole comparison
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    # Lightning's own code builds torch's LeafSpec, which torch now deprecates; it behaves as before.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - started
    module = module.cpu()
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    return module.model.eval(), checkpoint, seconds
