"""The video half: the Semantic Motion Predictor, the transition video model and pipeline, the first/last-frame
backend (diffusers' Wan and LTX pipelines), export."""

from storydiffusion.video.export import read_video, write_frames, write_video
from storydiffusion.video.flf2v import FLF2VBackend
from storydiffusion.video.pipeline import TransitionPipeline, TransitionPipelineOutput
from storydiffusion.video.smp import SemanticMotionPredictor, interpolate_embeddings
from storydiffusion.video.unet import frame_encoder_states, keyframe_condition, motion_adapter_for, transition_unet

__all__ = [
    "FLF2VBackend",
    "SemanticMotionPredictor",
    "TransitionPipeline",
    "TransitionPipelineOutput",
    "frame_encoder_states",
    "interpolate_embeddings",
    "keyframe_condition",
    "motion_adapter_for",
    "read_video",
    "transition_unet",
    "write_frames",
    "write_video",
]
