"""Training a `LatentUpsampler` (`upsampler`) for any diffusers VAE, on image folders read by `data`; `photos`
gathers the clean-licence photographs our FLUX.2 upsampler was trained on.

A tool above the runtime core: it imports `lssgen`, never the other way round.
"""
