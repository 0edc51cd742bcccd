"""Gradient map estimation (TRN, Hong et al. 2022): the input gradient an attacker would follow,
estimated without the true label, as the second input stream of TRN.

The gradient of the frozen classifier's summed fp32 cross-entropy with respect to the image, at
a label the classifier supplies itself:
- "predicted" (default): its top-1 class, the label FGSM/PGD would use if it had no other.
- "topk": the cross-entropies of its `top_k` classes weighted by their renormalized (detached)
  probabilities: smoother when the top-1 class is uncertain, as it is on adversarial images.
Then optionally the sign (what an Linf attack steps along; its derivative is zero, so white-box
attackers see no gradient through it) and a per-image normalization by the largest magnitude,
into [-1, 1]: raw gradients of a confident classifier are tiny and vary by orders of magnitude.

`create_graph=True` keeps the graph (double backprop), so an attacker can differentiate through
the map; the defense asks for it exactly when its input requires a gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Labelling = Literal["predicted", "topk"]


def _self_labelled_loss(logits: Tensor, labelling: Labelling, top_k: int) -> Tensor:
    if labelling == "predicted":
        return F.cross_entropy(logits, logits.argmax(1), reduction="sum")
    probabilities, classes = logits.softmax(1).topk(top_k, dim=1)
    weights = (probabilities / probabilities.sum(1, keepdim=True)).detach()
    return -(weights * logits.log_softmax(1).gather(1, classes)).sum()


def gradient_map(
    classifier: Callable[[Tensor], Tensor],
    x: Tensor,
    labelling: Labelling = "predicted",
    top_k: int = 3,
    sign: bool = False,
    normalize: bool = True,
    create_graph: bool = False,
) -> Tensor:
    """x: (N,C,H,W) float in [0,1] -> the estimated gradient map (N,C,H,W), in [-1,1] if normalized.

    With create_graph the map is a differentiable function of x (x must then require grad);
    without it x is detached and the map is a constant.
    """
    if labelling not in ("predicted", "topk"):
        raise ValueError(f"labelling must be 'predicted' or 'topk', got {labelling!r}")
    with torch.enable_grad():  # the defense also runs under no_grad when it is only scored
        inputs = x if create_graph else x.detach().requires_grad_(True)
        loss = _self_labelled_loss(classifier(inputs).float(), labelling, top_k)
        (gradient,) = torch.autograd.grad(loss, inputs, create_graph=create_graph)
    if sign:
        gradient = gradient.sign()
    if normalize:
        gradient = gradient / gradient.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return gradient
