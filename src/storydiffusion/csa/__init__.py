"""The CSA core: Consistent Self-Attention's math and processor, its controller and identity banks.

Nothing here knows about stories, files of the story format or the tiny world; pipelines build on it.
"""
