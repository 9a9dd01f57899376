"""Adapter file formats: native GeoLoRA, peft LoRA (training and serving), diffusers LoRA."""
