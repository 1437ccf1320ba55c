"""Knowledge distillation from a trained clothcli model, with timm's `LogitDistillationTask`.

The teacher is a run folder or checkpoint trained on the same classes in the same order. It is
loaded as `predict` runs a model (eval mode, batch norm folded, channels_last) and sees exactly the
student's augmented view ("consistent teaching", Beyer et al. 2022): the batch is renormalised to the
teacher's mean and std (timm's `DistillationTeacher.normalize_input`) and resized to the teacher's
input size, and the teacher runs under inference_mode. The task's loss is
(1 - alpha) * the student's own loss + alpha * T^2 * KL(teacher || student) at temperature T.
The teacher is not part of the training state: `--resume` loads it again from `distill.teacher`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from timm.task.distillation import DistillationTeacher, LogitDistillationTask
from torch import nn
from torch.nn import functional as F

from clothcli.config import Config
from clothcli.data.layout import class_difference
from clothcli.errors import UserError
from clothcli.models import Preprocess


class TimedTeacher(nn.Module):
    """The folded teacher behind a resize to its input size, timed: how much of each step it costs."""

    def __init__(self, model: nn.Module, input_size: int, device: torch.device):
        super().__init__()
        self.model, self.input_size, self.device = model, input_size, device
        self.seconds = 0.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():
            if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
                size = (self.input_size, self.input_size)
                images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
            logits = self.model(images.contiguous(memory_format=torch.channels_last))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return logits.clone()  # a normal tensor: the KL term keeps it for the student's backward pass


def load_teacher(cfg: Config, classes: list[str], device: torch.device) -> tuple[DistillationTeacher, Any]:
    """The teacher named by `distill.teacher`, wrapped for timm, and its InferenceModel (for its metadata)."""
    from clothcli.inference import load_for_inference

    loaded = load_for_inference(cfg.distill.teacher, device, fold=True, calibrated=False)
    if loaded.classes != classes:
        raise UserError(
            f"distill.teacher {cfg.distill.teacher} was trained on other classes: it "
            + class_difference(classes, loaded.classes)
        )
    size = cfg.distill.teacher_input_size or loaded.preprocess.input_size
    teacher = DistillationTeacher(TimedTeacher(loaded.model, size, device), device=device)
    teacher.mean_kd.copy_(torch.tensor(loaded.preprocess.mean).view(1, -1, 1, 1))
    teacher.std_kd.copy_(torch.tensor(loaded.preprocess.std).view(1, -1, 1, 1))
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher, loaded


def distillation_task(
    cfg: Config, student: nn.Module, teacher: DistillationTeacher, loss_fn: nn.Module, pre: Preprocess, device: Any
) -> LogitDistillationTask:
    """timm's logit distillation around the (prepared) student, with the student's own loss as the task loss."""
    task = LogitDistillationTask(
        student,
        teacher,
        criterion=loss_fn,
        distill_loss_weight=cfg.distill.alpha,
        task_loss_weight=1.0 - cfg.distill.alpha,
        temperature=cfg.distill.temperature,
        device=device,
        verbose=False,
    )
    task.student_mean.copy_(torch.tensor(pre.mean).view(1, -1, 1, 1))
    task.student_std.copy_(torch.tensor(pre.std).view(1, -1, 1, 1))
    return task


def teacher_seconds(task: LogitDistillationTask | None) -> float:
    """The teacher's forward time so far (0 without distillation)."""
    return task.teacher.model.seconds if task is not None else 0.0
