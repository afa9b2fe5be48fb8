"""Token labelling (LV-ViT's, which LVT is trained with): every patch token learns a dense label.

The loss is LV-ViT's (its ``tlt`` toolbox's ``TokenLabelCrossEntropy``, which this module computes itself, equal
to it to float precision, so that no run imports that unmaintained package): ``cls_weight * CE(class-token
logits, target mixed by MixToken's box) + dense_weight * CE(patch-token logits, dense targets)``. The data glue is
``data.TokenLabelImageFolder`` (the images, their score maps, and where each crop lies) and this module:

* ``dense_targets``: the targets of each crop: the score maps cut to the crop's box with ``roi_align`` at the token
  grid (and at 1 x 1 for the class token), softmax over classes, flipped with the image, label-smoothed.
* ``TokenLabelLoss``: the loss on the model's ``(class logits, patch logits, box)``. Without score maps the patch
  tokens learn each image's own label.
"""
from typing import Sequence, Tuple, Union

import torch
from timm.data.mixup import one_hot
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

__all__ = ['TokenLabelLoss', 'dense_targets']


def dense_targets(labels: torch.Tensor, score_maps: torch.Tensor, boxes: torch.Tensor, flipped: torch.Tensor,
                  grid: Sequence[int], num_classes: int, smoothing: float = 0.) -> torch.Tensor:
    """The targets of a batch of crops in ``tlt``'s layout (B, classes, 2 + tokens): the image labels, the class
    token's target (the score map over the whole crop), then each token's (row-major on ``grid``).

    Args:
        labels: (B,) image labels.
        score_maps: (B, 2, k, H, W): top-k scores, then their class indices.
        boxes: (B, 4) crops, (x0, y0, x1, y1) as fractions of the image.
        flipped: (B,) whether each crop was flipped horizontally.
        grid: (rows, columns) of the model's patch tokens.
        num_classes: classes of the model.
        smoothing: label smoothing.
    """
    batch, _, _, height, width = score_maps.shape
    scores = torch.zeros(batch, num_classes, height, width, device=score_maps.device)
    scores.scatter_(1, score_maps[:, 1].long(), score_maps[:, 0])
    rois = torch.cat([torch.arange(batch, device=boxes.device, dtype=boxes.dtype)[:, None],
                      boxes * boxes.new_tensor([width, height, width, height])], dim=1)
    tokens = roi_align(scores, rois, output_size=tuple(grid), aligned=True)
    tokens = torch.where(flipped.bool()[:, None, None, None], tokens.flip(-1), tokens)
    whole_crop = roi_align(scores, rois, output_size=(1, 1), aligned=True)
    targets = torch.cat([whole_crop.flatten(2), tokens.flatten(2)], dim=2).softmax(dim=1)
    targets = targets * (1. - smoothing) + smoothing / num_classes
    ground_truth = one_hot(labels, num_classes, on_value=1. - smoothing + smoothing / num_classes,
                           off_value=smoothing / num_classes)
    return torch.cat([ground_truth[:, :, None], targets], dim=2)


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross-entropy of ``logits`` (N, classes) against probabilities ``target``."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


class TokenLabelLoss(nn.Module):
    """LV-ViT's token-labelling loss on a model's dense training output ``(class logits, patch logits (B, H, W,
    classes), MixToken box)``, with targets built from the batch's labels: dense ones from score maps
    (``TokenLabelImageFolder``'s), or each image's label for all its tokens.

    The class token's target is the score map over the whole crop (or the label), mixed with the batch-flipped
    one by the share of the tokens that MixToken's box (x0, y0, x1, y1 on the token grid) swapped; the patch
    tokens' targets are not mixed, since the model swaps their logits back.
    """

    def __init__(self, num_classes: int, cls_weight: float = 1., dense_weight: float = 0.5, smoothing: float = 0.):
        super().__init__()
        if cls_weight + dense_weight <= 0:
            raise ValueError(f'the weights must not sum to 0 or less, got {cls_weight} and {dense_weight}')
        self.num_classes = num_classes
        self.cls_weight = cls_weight
        self.dense_weight = dense_weight
        self.smoothing = smoothing

    def forward(self, outputs: Tuple[torch.Tensor, torch.Tensor, Tuple[int, int, int, int]],
                targets: Union[torch.Tensor, Tuple[torch.Tensor, ...]]) -> torch.Tensor:
        cls_logits, patch_logits, (x0, y0, x1, y1) = outputs
        grid = patch_logits.shape[1:3]
        patch_logits = patch_logits.flatten(1, 2)
        tokens = patch_logits.shape[1]
        if isinstance(targets, torch.Tensor):
            off = self.smoothing / self.num_classes
            cls_target = one_hot(targets, self.num_classes, on_value=1. - self.smoothing + off, off_value=off)
            token_targets = cls_target[:, None].expand(-1, tokens, -1)
        else:
            dense = dense_targets(*targets, grid=grid, num_classes=self.num_classes, smoothing=self.smoothing)
            cls_target, token_targets = dense[:, :, 1], dense[:, :, 2:].transpose(1, 2)
        kept = 1. - (x1 - x0) * (y1 - y0) / tokens
        if kept < 1:
            cls_target = kept * cls_target + (1. - kept) * cls_target.flip(0)
        return (self.cls_weight * _soft_cross_entropy(cls_logits, cls_target)
                + self.dense_weight * _soft_cross_entropy(patch_logits.flatten(0, 1),
                                                         token_targets.flatten(0, 1)))
