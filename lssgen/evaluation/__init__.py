"""Measuring lssgen: speed side by side (`bench`), the compute bound (`flops`), the upsampler against its baselines
(`upsampler`), generation quality on the scene model (`generation`), GenEval batches (`geneval`), and the image
metrics they share (`metrics`).

A tool above the runtime core: it imports `lssgen`, never the other way round.
"""
