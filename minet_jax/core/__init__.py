"""The inference core: configuration, layers, the model, the fixed-point engine, weights,
the checkpoint format and `apply`.

Everything here imports only this folder (the oneDNN backend, `onednn`, only when a
convolution asks for it); the tools beside it and the training under ``train/`` build
on it, never the other way round.
"""
