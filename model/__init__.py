"""Longshot's model stack: causal video VAE, open_clip text encoder, Video DiT, rectified-flow sampling."""
from model.config import DiTConfig, FlowConfig, ModelConfig, TextConfig, VAEConfig, get_preset, preset_names
from model.generator import CheckpointError, Generator, VideoModel, Window
from model.text import TextEmbedding

__all__ = ["CheckpointError", "DiTConfig", "FlowConfig", "Generator", "ModelConfig", "TextConfig",
           "TextEmbedding", "VAEConfig", "VideoModel", "Window", "get_preset", "preset_names"]
