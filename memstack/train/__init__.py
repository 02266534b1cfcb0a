"""Training: optimizer groups, schedule, the segment loop with its BPTT policy, curricula,
checkpoint/resume, and data-parallel training under torchrun."""
from memstack.train.config import TrainConfig
from memstack.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
