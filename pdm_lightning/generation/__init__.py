"""Image generation, in one place: settings, prompts, jobs and seeds, sampling, output files.

``settings`` (how each image is sampled), ``prompts`` (placeholders, prompt files), ``jobs`` (which
images, with which seeds, in which batches), ``schedulers`` (samplers by name), ``sampling`` (the
pipeline over a module's live weights, and generation that leaves training untouched), ``files``
(PNGs with their metadata, grids, file names). It imports only ``pdm_lightning.core``.
"""
