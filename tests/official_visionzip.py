"""A transcription of how the official VisionZip code lays out a LLaVA-NeXT image for the LLM
(dvlab-research/VisionZip, visionzip/llava_arch.py: prepare_inputs_labels_for_multimodal_visionzip
with mm_patch_merge_type "spatial_unpad", and restore_image_features_sorted), written with its own
mechanism (a zero canvas filled through a boolean mask, reshaped to the full patch grid, read back
through the mask) so that it is independent of the package's index arithmetic
(visionzip_kernels.integrations.core.official_anyres_order). Test-only."""

from __future__ import annotations

import torch


def restore_image_features_sorted(
    subs: torch.Tensor, keep_idx: torch.Tensor, width: int, height: int, side: int
) -> torch.Tensor:
    """subs (P, k, C): the sub-crops' compressed rows (D dominant rows in ascending token index, CLS
    first, then the contextual rows); keep_idx (P, D) their dominant token indices; the crop grid is
    ``height`` rows x ``width`` columns of ``side`` x ``side`` patches. Returns the dominant patch rows
    in raster order of the full grid, then the P CLS rows, then the P x Cx contextual rows."""
    p, k, c = subs.shape
    d = keep_idx.shape[1]
    patches = keep_idx.sort(dim=1).values[:, 1:] - 1  # the CLS (index 0) leaves the spatial block
    canvas = subs.new_zeros(p, side * side, c)
    mask = torch.zeros(p, side * side, dtype=torch.bool, device=subs.device)
    mask.scatter_(1, patches, True)
    canvas[mask] = subs[:, 1:d].reshape(-1, c)

    def to_grid(t: torch.Tensor) -> torch.Tensor:  # (P, side, side, ...) -> (height*side, width*side, ...)
        t = t.view(height, width, side, side, *t.shape[3:]).permute(0, 2, 1, 3, *range(4, t.dim() + 1))
        return t.reshape(height * side, width * side, *t.shape[4:])

    restored = to_grid(canvas.view(p, side, side, c))[to_grid(mask.view(p, side, side))]
    return torch.cat([restored, subs[:, 0], subs[:, d:].reshape(-1, c)])


def official_image_features(crops: torch.Tensor, keep_idx: torch.Tensor, grid: tuple[int, int], side: int):
    """The sequence for one image of 1 + P crops (base first): the base crop's rows as they are, then
    the restored sub-crops (no image_newline)."""
    rows, cols = grid
    return torch.cat([crops[0], restore_image_features_sorted(crops[1:], keep_idx[1:], cols, rows, side)])
