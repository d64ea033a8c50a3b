"""trainers: turn a few product photos into a LoRA adapter for the base (knows nothing about sessions).

annotate (DETR boxes, backdrop fallback) -> data (SubjectDataModule: crops, torchvision v2 augmentation, Bezier
masks) -> lora_module (SubjectLoRAModule: PEFT LoRA, Paint-by-Example denoising loss, Lightning) -> export (the
interchange safetensors file). Imports only subjectpaint.base and subjectpaint.masks from the SDK.
"""

TRAINER_VERSION = "subjectpaint-trainers/0.1"
