"""The oracles, side by side: :func:`compress_reference` (docs/spec.md "Compress"),
:func:`cls_scores_reference` / :func:`received_scores_reference` (docs/spec.md "Scores") and
:func:`group_pool_reference` (docs/spec.md "Group pool").

Every test and benchmark imports its expected values from here; each is also the "reference"
backend of its op. The benchmarks' *eager* baseline (the original code as written) is
``visionzip_kernels.baseline.visionzip_eager``, not an oracle.
"""

from .compress import (
    argmax_lowest,
    assign_to_targets,
    compress_reference,
    compress_reference_from_plan,
    member_positions,
    merge_contextual,
    normalize_rows,
    rank_descending,
    remaining_indices,
    select_dominant,
    target_positions,
    token_scores,
)
from .group_pool import group_labels, group_pool_reference
from .scores import cls_scores_reference, received_scores_reference, segment_ids

__all__ = [
    "argmax_lowest",
    "assign_to_targets",
    "cls_scores_reference",
    "compress_reference",
    "compress_reference_from_plan",
    "group_labels",
    "group_pool_reference",
    "member_positions",
    "merge_contextual",
    "normalize_rows",
    "rank_descending",
    "received_scores_reference",
    "remaining_indices",
    "segment_ids",
    "select_dominant",
    "target_positions",
    "token_scores",
]
