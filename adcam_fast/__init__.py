"""adcam_fast: AD-CAM pseudo-labels, from the readable reference to fused Triton kernels.

Importing the package registers the Conformer variants with timm
(``timm.create_model("conformer_small_patch16", num_classes=K)``).
"""

from adcam_fast import models  # noqa: F401  (registers the timm models)
from adcam_fast.cam import merge_scales, normalize_cam, seed_labels
from adcam_fast.ops import adcam
from adcam_fast.reference import coneighbor_similarity, diffuse, refine_attention

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "adcam",
    "coneighbor_similarity",
    "diffuse",
    "merge_scales",
    "normalize_cam",
    "refine_attention",
    "seed_labels",
]
