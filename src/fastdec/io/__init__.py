"""fastdec's I/O layer: every file fastdec reads or writes goes through one of these modules.

- ``files``: atomic writes, JSON (one rule for non-finite numbers), CSV, output names kept in their folder
- ``latents``: the one reader of latent files (.safetensors/.pt/.pth/.npy, single tensors and shards)
- ``images``: the image suffix list, loading, tensor -> uint8, atomic saving
- ``video``: video files (PyAV) and frame folders
- ``checkpoints``: decoder/encoder weights (fastdec safetensors, TAESD .pth, AutoencoderTiny)
"""
