"""Evaluation: ``metrics`` (streaming image/pixel AUROC, AP, F1-max, AUPRO), ``evaluate`` (a model on a test
manifest: the report, tables, panels, histograms) and ``report`` (the demo's HTML/Markdown report)."""
