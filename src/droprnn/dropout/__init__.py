"""Dropout: the named schemes (``modes``), the per-call mask plan of recurrent layers (``plan``), the
dropout-family layers (``layers``) and MC-dropout prediction (``mc``).

This package's ``__init__`` imports nothing, so cells can use ``modes`` and ``plan`` without a cycle.
"""
