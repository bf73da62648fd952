"""Training of the multi-label classifier and the segmenter.

``adcam train-classifier`` / ``adcam train-segmenter`` call :func:`classifier.run` /
:func:`segmenter.run` (arguments from their ``add_arguments``). The label pipeline and the
exporter load the results with :func:`load_classifier` / :func:`load_segmenter`.

Modules: ``augment`` (IRN-style transforms), ``schedules`` (poly / constant lr),
``metrics`` (mAP, F1, mIoU), ``checkpoint`` (atomic save, validated load, RNG state),
``engine`` (the shared loop: DDP, AMP, progress, resume, logs), ``classifier``,
``segmenter``.
"""

from adcam_fast.training.checkpoint import load_classifier, load_segmenter

__all__ = ["load_classifier", "load_segmenter"]
