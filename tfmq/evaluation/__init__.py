"""Evaluation suite (docs/method.md section 9): sample quality (FID/sFID/KID/IS, torch-fidelity extractors),
domain classifier metrics, CLIP score, and the poster's temporal-disturbance analyses.

Submodules are imported explicitly (``from tfmq.evaluation import metrics``) so that importing the
package stays cheap: ``extractors`` registers torch-fidelity extractors, ``feature_metrics`` is the
arithmetic on features (Fréchet distance, bootstrap CI, KID, IS), ``reference_stats`` embeds images
and caches the reference side, ``metrics`` ties them together (``compute_metrics``; it re-exports
both), ``classifier`` the Fashion-MNIST domain classifier, ``clip_score``, ``temporal_features``
(feature error, mismatch) and ``trajectory`` (trajectory deviation, activation ranges), both
re-exported by ``temporal`` with its one-call ``temporal_report``, and ``plots`` (their figures).
"""
