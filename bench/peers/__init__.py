"""Reference servers the benchmark runs beside ours. They are not shipped.

Both serve the same URLs and the same publish endpoint as ours, so one load
generator drives all three.
"""

# Every peer's listen queue, as ours has (server/__main__.py): a storm's 1,000 connects at
# once overflow aiohttp's default of 128, and each dropped SYN costs its client a second.
PEER_BACKLOG = 1024
