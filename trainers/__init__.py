"""trainers: turn a few product photos into a LoRA adapter for the base (knows nothing about sessions).

`train_subject(base, photos, recipe)` (train.py) runs the whole pipeline with a `TrainRecipe` (recipe.py: presets
"paint-by-example" and "demo", resolved from the base): annotate (DETR boxes, backdrop fallback) -> data
(SubjectDataModule: crops, torchvision v2 augmentation, Bezier masks) -> lora_module (SubjectLoRAModule: PEFT LoRA,
Paint-by-Example denoising loss, Lightning) -> export (the interchange safetensors tensors + metadata).
Imports only subjectpaint's leaf modules (base, masks, images, errors) from the SDK.
"""

def __getattr__(name):  # `trainers.train_subject` / `trainers.TrainRecipe` without importing Lightning up front
    if name == "train_subject":
        from .train import train_subject

        return train_subject
    if name == "TrainRecipe":
        from .recipe import TrainRecipe

        return TrainRecipe
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")
