"""Knowledge distillation from trained clothcli models, with timm's `LogitDistillationTask`.

The teacher is a run folder or checkpoint trained on the same classes in the same order, or a list
of them (an ensemble: their logits are averaged, as their log-probabilities would be). Each is
loaded as `predict` runs a model (eval mode, batch norm folded, channels_last) and sees exactly the
student's augmented view ("consistent teaching", Beyer et al. 2022): the batch is renormalised to
that teacher's mean and std and resized to its input size, and the teachers run under
inference_mode. The views are drawn at the largest side among student and teachers (`view_size`) and
the student gets them resized down to its own crop: a 224-px teacher shown the student's 192-px view
upscaled loses what the extra pixels held (EfficientNet-Lite0 on validation: 92.96% at 224 px, 90.32%
on 192-px views upscaled to 224, the student's own level). The task's loss is
(1 - alpha) * the student's own loss + alpha * T^2 * KL(teacher || student) at temperature T.
The teachers are not part of the training state: `--resume` loads them again from `distill.teacher`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from timm.task.distillation import DistillationTeacher, LogitDistillationTask
from torch import nn
from torch.nn import functional as F

from clothcli.config import Config
from clothcli.data.layout import class_difference
from clothcli.data.preprocess import Preprocess
from clothcli.errors import UserError


@dataclass
class TeacherView:
    """How one teacher wants the student's view: its input side, mean and std."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TimedTeachers(nn.Module):
    """The folded teachers, each behind a renormalisation and a resize to its own input, their logits
    averaged, and timed: how much of each step they cost. Input: a batch normalised for the student."""

    def __init__(self, models: list[nn.Module], views: list[TeacherView], student: Preprocess, device: torch.device):
        super().__init__()
        self.models, self.views, self.device = nn.ModuleList(models), views, device
        # student-normalised x -> teacher-normalised: (x * s_std + s_mean - t_mean) / t_std = x * scale + shift
        s_mean, s_std = torch.tensor(student.mean), torch.tensor(student.std)
        self.affine = [
            (
                (s_std / torch.tensor(v.std)).view(1, -1, 1, 1).to(device),
                ((s_mean - torch.tensor(v.mean)) / torch.tensor(v.std)).view(1, -1, 1, 1).to(device),
            )
            for v in views
        ]
        self.seconds = 0.0

    def _view(self, images: torch.Tensor, index: int) -> torch.Tensor:
        scale, shift = self.affine[index]
        images = images * scale + shift
        side = self.views[index].input_size
        if images.shape[-1] != side or images.shape[-2] != side:
            images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return images.contiguous(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():
            logits = torch.stack([model(self._view(images, i)) for i, model in enumerate(self.models)])
            logits = logits.float().mean(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return logits.clone()  # a normal tensor: the KL term keeps it for the student's backward pass


class ResizedStudent(nn.Module):
    """The student behind a resize of the shared view to its own training crop (antialiased, so a
    downscaled view is what a crop drawn at the student's side would have been, up to resampling)."""

    def __init__(self, model: nn.Module, side: int, pre: Preprocess, channels_last: bool):
        super().__init__()
        self.model, self.side, self.channels_last = model, side, channels_last
        self.mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
        self.pretrained_cfg = {"mean": pre.mean, "std": pre.std}  # what timm's task reads off a student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.side, self.side):
            images = F.interpolate(images, size=(self.side, self.side), mode=self.mode, antialias=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)


def view_size(cfg: Config, student_crop: int, views: list[TeacherView]) -> int:
    """Side of the augmented views student and teachers share: `distill.view_size`, else the largest."""
    return cfg.distill.view_size or max([student_crop, *(v.input_size for v in views)])


def teacher_paths(cfg: Config) -> list[str]:
    """`distill.teacher` as a list (one path or several)."""
    teacher = cfg.distill.teacher
    return [teacher] if isinstance(teacher, str) else list(teacher or [])


def load_teacher(
    cfg: Config, classes: list[str], pre: Preprocess, device: torch.device
) -> tuple[DistillationTeacher, list[Any]]:
    """The teachers named by `distill.teacher`, wrapped for timm, and their InferenceModels (for their
    metadata). The wrapper gets the student's normalisation, so timm's renormalisation is the identity
    and each teacher renormalises for itself."""
    from clothcli.models.loading import load_for_inference

    loaded = []
    for path in teacher_paths(cfg):
        teacher = load_for_inference(path, device, fold=True, calibrated=False)
        if teacher.classes != classes:
            raise UserError(
                f"distill.teacher {path} was trained on other classes: it " + class_difference(classes, teacher.classes)
            )
        loaded.append(teacher)
    views = [
        TeacherView(cfg.distill.teacher_input_size or t.preprocess.input_size, t.preprocess.mean, t.preprocess.std)
        for t in loaded
    ]
    timed = TimedTeachers([t.model for t in loaded], views, pre, device)
    wrapped = DistillationTeacher(timed, device=device)
    wrapped.mean_kd.copy_(torch.tensor(pre.mean).view(1, -1, 1, 1))
    wrapped.std_kd.copy_(torch.tensor(pre.std).view(1, -1, 1, 1))
    for parameter in wrapped.parameters():
        parameter.requires_grad_(False)
    return wrapped, loaded


def distillation_task(
    cfg: Config, student: ResizedStudent, teacher: DistillationTeacher, loss_fn: nn.Module, device: Any
) -> LogitDistillationTask:
    """timm's logit distillation around the (prepared, resized) student, with the student's own loss as the
    task loss; timm takes the student's mean and std from its `pretrained_cfg`."""
    return LogitDistillationTask(
        student,
        teacher,
        criterion=loss_fn,
        distill_loss_weight=cfg.distill.alpha,
        task_loss_weight=1.0 - cfg.distill.alpha,
        temperature=cfg.distill.temperature,
        device=device,
        verbose=False,
    )


def teacher_seconds(task: nn.Module) -> float:
    """The teachers' forward time so far (0 for a task without teachers)."""
    return task.teacher.model.seconds if isinstance(task, LogitDistillationTask) else 0.0
