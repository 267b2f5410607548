"""Evaluation without DeepSpeed or a process group: export, whole-volume inference, metrics, reports."""
