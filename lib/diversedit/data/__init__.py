"""Datasets: sklearn digits (CPU tier, pixel space) and ImageNet SD-VAE latents (REPA layout)."""

from .digits import DigitsDataset, decode_pixels, digits_images, digits_pixels
from .latents import SD_VAE_SCALE, LatentDataset, sample_latents
from .prepare import center_crop_arr, decode_latents, encode_moments, load_vae, prepare_imagenet

__all__ = [
    "SD_VAE_SCALE",
    "DigitsDataset",
    "LatentDataset",
    "center_crop_arr",
    "decode_latents",
    "decode_pixels",
    "digits_images",
    "digits_pixels",
    "encode_moments",
    "load_vae",
    "prepare_imagenet",
    "sample_latents",
]
