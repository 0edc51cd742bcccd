"""CIIDefence (Gupta & Rahtu, ICCV 2019): class-specific inpainting fused with wavelet denoising.

    python eval.py ... --defense configs/defenses/cii_telea.yaml        (OpenCV Telea inpainting)
    python eval.py ... --defense checkpoints/cii_cifar10.pt             (a trained inpainter, restorers/inpainter.py)

The paper publishes no code; this is our reading of it. For x (N,C,H,W) in [0,1]:
1. class activation maps (defenses/cam.py) of the `top_classes` classes the classifier ranks
   highest on x;
2. per class, its `maxima` strongest CAM peaks with non-maximum suppression (no two peaks closer
   than `nms_radius` + 1 pixels in either direction; default 2 * half_width, so boxes do not
   overlap), and a mask of boxes of side 2 * half_width + 1 around them;
3. per class, the image inpainted inside its mask: the regions that drive that class's score,
   where an adversarial perturbation concentrates, are replaced by what their surroundings imply;
4. fusion with the wavelet denoiser (defenses/wavelet.py), averaged over the classes:
   - "paste": the inpainted boxes over the wavelet-denoised image;
   - "blend": blend * denoised + (1 - blend) * inpainted, over the whole image.

The mask choice (top-k, argmax, NMS) and the Telea inpainting are not differentiable, so the defense
declares `differentiable = False` and eval.py attacks it with BPDA. The surrogate holds the mask
the forward pass chose fixed, keeps the wavelet denoiser (differentiable) and a learned
inpainter (differentiable), and replaces Telea by the identity inside the boxes. With a learned
inpainter the surrogate is then the defense itself wherever the mask does not change, so BPDA
gives the true gradient almost everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from defenses.base import Defense
from defenses.cam import CamLayers, box_mask, class_activation_maps, locate_cam_layers, peak_coordinates
from defenses.transforms import to_uint8
from defenses.wavelet import wavelet_denoise

Fusion = Literal["paste", "blend"]


class Inpainter(nn.Module):
    """(x (N,C,H,W) in [0,1], mask (N,1,H,W) in {0,1}) -> (N,C,H,W) in [0,1], equal to x where mask is 0.

    differentiable: autograd through forward gives its gradient (the BPDA surrogate keeps it);
    otherwise the surrogate passes x through inside the mask.
    """

    differentiable: bool = True


class TeleaInpainter(Inpainter):
    """OpenCV's fast-marching inpainting (Telea 2004), one image at a time on the CPU in uint8."""

    differentiable = False

    def __init__(self, radius: int = 3) -> None:
        super().__init__()
        if radius < 1:
            raise ValueError(f"the Telea radius must be >= 1 pixel, got {radius}")
        self.radius = radius

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        import cv2

        images = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        holes = mask[:, 0].to(torch.uint8).cpu().numpy()
        filled = np.stack(
            [
                cv2.inpaint(np.ascontiguousarray(image), hole, self.radius, cv2.INPAINT_TELEA).reshape(image.shape)
                for image, hole in zip(images, holes)
            ]
        )
        inpainted = torch.from_numpy(filled).to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255
        return torch.where(mask > 0, inpainted, x)


class CIIDefence(Defense):
    """CAM-guided class-specific inpainting fused with wavelet denoising (see module docstring).

    inpainter: "telea" (OpenCV, `telea_radius`) or a trained Inpainter (from its export file).
    top_classes, maxima, half_width, nms_radius: which boxes; fusion, blend: how the inpainted
    images meet the wavelet-denoised one; wavelet, sigma: the denoiser's (defenses/wavelet.py);
    cam_layer: the classifier module whose map the CAM uses (None: found, defenses/cam.py).
    """

    differentiable = False
    needs_classifier = True

    def __init__(
        self,
        classifier: nn.Module,
        inpainter: Inpainter | str = "telea",
        top_classes: int = 2,
        maxima: int = 3,
        half_width: int = 3,
        nms_radius: int | None = None,
        fusion: Fusion = "paste",
        blend: float = 0.5,
        wavelet: str = "db1",
        sigma: float | None = None,
        cam_layer: str | None = None,
        telea_radius: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(inpainter, str) and inpainter != "telea":
            raise ValueError(
                f"inpainter {inpainter!r}: by name only 'telea' is available; a trained inpainter comes from its "
                "export file (--defense checkpoints/cii_<data>.pt, written by `train.py fit --config "
                "configs/cii_<data>.yaml`)"
            )
        if min(top_classes, maxima) < 1 or half_width < 0 or (nms_radius is not None and nms_radius < 0):
            raise ValueError("top_classes and maxima must be >= 1, half_width and nms_radius >= 0")
        if fusion not in ("paste", "blend") or not 0 <= blend <= 1:
            raise ValueError(f"fusion must be 'paste' or 'blend' and blend in [0, 1], got {fusion!r}, {blend}")
        self.classifier = classifier
        self.inpainter = TeleaInpainter(telea_radius) if isinstance(inpainter, str) else inpainter
        self.top_classes = top_classes
        self.maxima = maxima
        self.half_width = half_width
        self.nms_radius = 2 * half_width if nms_radius is None else nms_radius
        self.fusion = fusion
        self.blend = blend
        self.wavelet = wavelet
        self.sigma = sigma
        self.cam_layer = cam_layer
        self.telea_radius = telea_radius
        self._layers: CamLayers | None = None

    def spec(self) -> dict[str, Any]:
        return {
            "name": "cii",
            "inpainter": "telea" if isinstance(self.inpainter, TeleaInpainter) else "learned",
            "top_classes": self.top_classes,
            "maxima": self.maxima,
            "half_width": self.half_width,
            "nms_radius": self.nms_radius,
            "fusion": self.fusion,
            "blend": self.blend,
            "wavelet": self.wavelet,
            "sigma": self.sigma,
            "cam_layer": self.cam_layer,
            "telea_radius": self.telea_radius,
        }

    def masks(self, x: Tensor) -> Tensor:
        """x: (N,C,H,W) in [0,1] -> (N,top_classes,1,H,W) box masks in {0,1}, one per top class."""
        if self._layers is None:
            self._layers = locate_cam_layers(self.classifier, x[:1], self.cam_layer)
        maps, _ = class_activation_maps(self.classifier, x, self.top_classes, self._layers)
        peaks = peak_coordinates(maps.flatten(0, 1), self.maxima, self.nms_radius)
        return box_mask(peaks, self.half_width, x.shape[-2:]).unflatten(0, maps.shape[:2]).detach()

    def purify(self, x: Tensor, masks: Tensor, differentiable: bool = False) -> Tensor:
        """Inpaint each class's boxes and fuse with the denoised image; masks from `masks(x)`.
        differentiable: the BPDA surrogate (a non-differentiable inpainter passes x through)."""
        count = masks.shape[1]
        repeated, flat_masks = x.repeat_interleave(count, 0), masks.flatten(0, 1)
        if differentiable and not self.inpainter.differentiable:
            inpainted = repeated
        else:
            inpainted = self.inpainter(repeated, flat_masks)
        inpainted = inpainted.unflatten(0, (len(x), count))
        denoised = wavelet_denoise(x, self.wavelet, None, self.sigma, ycbcr=x.shape[1] == 3).unsqueeze(1)
        if self.fusion == "paste":
            fused = masks * inpainted + (1 - masks) * denoised
        else:
            fused = self.blend * denoised + (1 - self.blend) * inpainted
        return fused.mean(1).clamp(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.purify(x, self.masks(x))

    def surrogate(self, x: Tensor) -> Tensor:
        return self.purify(x, self.masks(x), differentiable=True)

    def bpda(self, x: Tensor) -> Tensor:
        """The defense on the forward pass, the fixed-mask surrogate's gradient (one mask for both).
        With a differentiable inpainter the surrogate is the defense itself, so it runs once."""
        masks = self.masks(x)
        stand_in = self.purify(x, masks, differentiable=True)
        if self.inpainter.differentiable:
            return stand_in
        with torch.no_grad():
            output = self.purify(x, masks)
        return stand_in + (output - stand_in).detach()
