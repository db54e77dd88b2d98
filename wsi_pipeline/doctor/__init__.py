"""`wsip doctor`: is this installation able to run the pipeline, and does its GPU agree with its CPU?

Not a stage (it processes no slides): the CLI calls it like a stage, and it reads the rest of the package.
`environment` answers in well under a second without importing torch: versions from package metadata,
devices from `nvidia-smi`, the scan backend of each device from `models/ssm/backend.py`'s rule, weights from
their caches (`models/pretrained.py`). `gpu` (`--gpu`) runs the self-check that needs torch and a GPU.
See docs/doctor.md.
"""

from wsi_pipeline.doctor.environment import FAIL, INFO, OK, WARN, Finding, environment_report

__all__ = ["FAIL", "INFO", "OK", "WARN", "Finding", "environment_report"]
