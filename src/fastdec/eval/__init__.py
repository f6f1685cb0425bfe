"""fastdec's evaluation wing: what ``fastdec eval images|video`` measures, runs and writes.

- ``metrics``: PSNR/SSIM/MS-SSIM/LPIPS (torchmetrics), confidence intervals, streamed Fréchet statistics,
  flicker, feature extractors for FID/FVD
- ``run``: ``evaluate_images`` / ``evaluate_video``, one skeleton with the image/video differences plugged in
- ``report``: report.json, report.md, CSV tables, figures and the terminal summary
- ``cli``: the ``fastdec eval`` argument definitions

Kept light on purpose: training imports ``metrics`` and should not pull in the evaluation runner.
"""
