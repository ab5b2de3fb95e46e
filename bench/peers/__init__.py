"""Reference servers the benchmark runs beside ours. They are not shipped.

Both serve the same URLs and the same publish endpoint as ours, so one load
generator drives all three.
"""
