"""The FSAM math, written once over lists of local shard views. Imports only torch."""

from .comm import REPLICATED, all_reduce, communicates, global_sums
from .fsam import FSAM, Perturbation, compute_mask, count_nonfinite, fisher_scores, perturb, restore
from .masks import Mask
from .norms import grad_norm
from .select import global_topk_mask, topk_masks
from .views import DEFAULT_EXCLUDE, ShardView, global_positions, is_eligible

__all__ = [
    "DEFAULT_EXCLUDE", "FSAM", "Mask", "Perturbation", "REPLICATED", "ShardView", "all_reduce", "communicates",
    "compute_mask", "count_nonfinite", "fisher_scores", "global_positions", "global_sums", "global_topk_mask",
    "grad_norm", "is_eligible", "perturb", "restore", "topk_masks",
]
