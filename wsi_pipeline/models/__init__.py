"""Models: patch encoders (`encoders/`), slide-level MIL models (`mil/`, one `create_model`), and the
selective scans and Mamba blocks the Mamba-based MIL models share (`ssm/`).

Importing this package (or `mil`) must stay cheap (no torch): model modules are imported on first use.
"""
