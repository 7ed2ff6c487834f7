"""Evaluation: ``metrics`` (streaming image/pixel AUROC, AP, F1-max, AUPRO) and ``evaluate`` (a model on a test
manifest: the report, tables, panels, histograms)."""
