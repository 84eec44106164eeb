"""Evaluation suite (docs/method.md section 9): sample quality (FID/sFID/KID/IS, torch-fidelity extractors),
domain classifier metrics, CLIP score, and the poster's temporal-disturbance analyses.

Submodules are imported explicitly (``from tfmq.evaluation import metrics``) so that importing the
package stays cheap: ``extractors`` registers torch-fidelity extractors, ``metrics`` caches reference
statistics and computes metrics, ``classifier`` the Fashion-MNIST domain classifier, ``clip_score``,
``temporal`` (analyses) and ``plots`` (their figures).
"""
