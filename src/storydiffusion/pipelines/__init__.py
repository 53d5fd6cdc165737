"""Pipelines: `StoryPipeline` around a diffusers pipeline, frames and their line syntax, long-prompt
encoding, and tiny random pipelines built from configs (for tests and `--model tiny-random`)."""
