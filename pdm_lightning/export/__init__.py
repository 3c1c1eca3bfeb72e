"""Exporting trained weights in the formats users load: diffusers folders, kohya LoRA, original-layout single file."""
