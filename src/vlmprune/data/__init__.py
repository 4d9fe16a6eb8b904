"""Every dataset a command reads (issue 17): JSONL rows, an image folder with one prompt, Hugging Face
`datasets`, FashionScenes (``testbed``), and text for text-only LMs; prompts in the checkpoint's own
chat template; batches for calibration, router training and evaluation; the seeded calibration and
training scenes (`calibration.py`)."""

from .batches import encode_examples, example_batches, image_channels
from .calibration import CALIBRATION_SEED, calibration_batches, scene_batches, text_batches, training_scenes
from .examples import Example, take
from .images import conform_image, read_image
from .prompts import chat_prompt
from .sources import read_examples, read_folder, read_hf, read_jsonl, read_texts, scene_examples

__all__ = [
    "CALIBRATION_SEED",
    "Example",
    "calibration_batches",
    "chat_prompt",
    "conform_image",
    "encode_examples",
    "example_batches",
    "image_channels",
    "read_examples",
    "read_folder",
    "read_hf",
    "read_image",
    "read_jsonl",
    "read_texts",
    "scene_batches",
    "scene_examples",
    "take",
    "text_batches",
    "training_scenes",
]
