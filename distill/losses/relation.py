"""Relation-based losses: the student learns how the teacher arranges the examples of a batch relative to each
other, not the teacher's vectors themselves, so the two widths may differ and no projection is learned. Each
example is pooled to one vector from a chosen hidden-state layer (default: the last).

- `rkd_distance`, `rkd_angle`: Relational Knowledge Distillation (Park et al. 2019), on distances between pairs
  (normalised by their mean, so only relative distances count) and on angles in triplets.
- `similarity`: the batch's matrix of pairwise cosine similarities (in the spirit of Tung & Mori 2019)."""
import torch
import torch.nn.functional as F

from distill.core.config import LossConfig
from distill.core.loss_interface import DistillLoss, LossInputs, LossSetup, register
from distill.losses.hidden import chosen_layers
from distill.losses.pooling import check_pooling, pool


def _mean_smooth_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (Huber, delta 1) averaged over the entries; 0 when there are none (a batch too small to relate)."""
    return F.smooth_l1_loss(student, teacher, reduction="sum") / max(student.numel(), 1)


def _normalised_distances(points: torch.Tensor) -> torch.Tensor:
    """Distances between every pair of points, divided by their mean over non-zero ones (duplicates give 0)."""
    distances = torch.pdist(points)
    mean = distances.sum() / (distances > 0).sum().clamp_min(1)
    return distances / mean.clamp_min(1e-12)


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between the normalised pairwise distances of the student's and the teacher's (batch, width)."""
    return _mean_smooth_l1(_normalised_distances(student), _normalised_distances(teacher))


def triplet_cosines(points: torch.Tensor) -> torch.Tensor:
    """cos of the angle at point i between points j and k, for every (i, j, k) of three different points."""
    n = points.shape[0]
    directions = F.normalize(points.unsqueeze(0) - points.unsqueeze(1), dim=-1)  # [i, j]: unit vector i -> j
    cosines = directions @ directions.transpose(1, 2)  # [i, j, k]
    index = torch.arange(n, device=points.device)
    i, j, k = index.view(n, 1, 1), index.view(1, n, 1), index.view(1, 1, n)
    return cosines[(i != j) & (i != k) & (j != k)]


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between the triplet angle cosines of the student's and the teacher's (batch, width)."""
    return _mean_smooth_l1(triplet_cosines(student), triplet_cosines(teacher))


def cosine_matrix(points: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(points, dim=-1)
    return unit @ unit.T


def similarity_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the teacher's (batch, batch) cosine-similarity matrices."""
    return F.mse_loss(cosine_matrix(student), cosine_matrix(teacher))


class _RelationLoss(DistillLoss):
    needs_hidden_states = True
    options = ("student_layer", "teacher_layer", "pooling")
    relation = staticmethod(rkd_distance)

    @classmethod
    def check_options(cls, spec: LossConfig, where: str = "") -> None:
        check_pooling(spec, where)

    def __init__(self, spec: LossConfig, setup: LossSetup):
        super().__init__(spec, setup)
        last = setup.student_config.num_hidden_layers
        self.student_layer, self.teacher_layer = chosen_layers(spec, setup, default_student_layer=last)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        mask, how = inputs.attention_mask, self.spec.pooling
        student = pool(inputs.student.hidden_states[self.student_layer], mask, how).float()
        teacher = pool(inputs.teacher.hidden_states[self.teacher_layer], mask, how).float()
        return self.relation(student, teacher)


@register("rkd_distance")
class RKDDistance(_RelationLoss):
    relation = staticmethod(rkd_distance)


@register("rkd_angle")
class RKDAngle(_RelationLoss):
    relation = staticmethod(rkd_angle)


@register("similarity")
class Similarity(_RelationLoss):
    relation = staticmethod(similarity_mse)
