"""What renders deployment documents from the typed configs: ``kuberay`` (KubeRay manifests) and
``config_reference`` (docs/config.md). They render Serve configs, so they sit above ``anomalymoe.serve``."""
