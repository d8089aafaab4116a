"""The classification stages, one module each, with its VERSION beside its code.

discover ──► encode_images ─────┐
    │                           ├──► classify ──► publish ──► report
    ├──────► truth ─────────────┤
encode_labels ──────────────────┘

Each is a plain function `fn(ctx, **inputs, **params)` for the engine's runner; `runtime.py` holds what they
share at run time without it entering a fingerprint.
"""
