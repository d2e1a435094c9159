"""Dropout's data: the named schemes (``modes``), the per-call mask plan of recurrent layers and the masks of
one step (``plan``), and MC-dropout prediction (``mc``). The dropout-family layers are layers
(:mod:`droprnn.layers.dropout`).

This package imports nothing of droprnn's but ``errors`` and ``random``: cells, layers and kernels build on
it, never the other way round.
"""
